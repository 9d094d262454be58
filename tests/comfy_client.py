"""A small client for a running ComfyUI (stdlib only) and a UI-workflow -> API-prompt converter.

The converter follows the frontend's graphToPrompt for what our workflows use: widgets in node-definition
input order (required, then optional), the extra "control_after_generate" value after seed-like INT widgets,
the upload value after LoadImage's image, links, and Note nodes skipped.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid

VIRTUAL = {"Note", "MarkdownNote", "Reroute"}


class Comfy:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def request(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw else None

    def queue(self, prompt: dict) -> tuple[int, dict]:
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            _, history = self.request("GET", f"/history/{prompt_id}")
            entry = (history or {}).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("completed") or status.get("status_str") == "error":
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue and wait; raises AssertionError with the server's answer if the prompt was refused."""
        code, answer = self.queue(prompt)
        assert code == 200, answer
        return self.wait(answer["prompt_id"], timeout)


def error_of(entry: dict) -> dict | None:
    """The execution_error message of a finished history entry, if any."""
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return data
    return None


def widget_names(node_def: dict) -> list[tuple[str, int]]:
    """[(input name, number of stored widget values)] in the order the frontend stores widgets_values (the same
    layout workflows/build.py writes)."""
    return [(name, n) for name, n, _ in workflow_builder().widget_layout(node_def)]


def workflow_builder():
    """workflows/build.py, the one definition of the widget layout."""
    import importlib.util
    import sys
    from pathlib import Path

    if "sana_workflow_build" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sana_workflow_build",
                                                      Path(__file__).resolve().parents[1] / "workflows" / "build.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[spec.name] = module
    return sys.modules["sana_workflow_build"]


def to_api(workflow: dict, object_info: dict) -> dict:
    """UI-format workflow -> API prompt {id: {"class_type", "inputs"}}; KeyError names a missing node type."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL or node.get("mode") in (2, 4):
            continue
        if node["type"] not in object_info:
            raise KeyError(f"node {node['id']}: type {node['type']!r} is not installed")
        inputs, values, i = {}, node.get("widgets_values") or [], 0
        for name, n in widget_names(object_info[node["type"]]):
            if i < len(values):
                inputs[name] = values[i]
            i += n
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, src, src_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
