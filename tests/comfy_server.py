"""The real ComfyUI of the end-to-end tests (`test_comfyui_*.py`): found, built and started once per test run.

ComfyUI comes from COMFYUI_PATH (COMFYUI_PYTHON: the Python of its environment, default this one), or else is
built from the snapshot in ../shared/comfyui (SANA_COMFYUI_SNAPSHOT: another folder holding its setup.sh) into
.comfyui/ in this repo: `start_setup` launches that build in the background when the test run is collected (the
unit tests run meanwhile; conftest puts the host suite last) and `comfyui()` waits for it. Without either the
host tests are skipped with that reason, except under CI=true, where it is an error.

`serve` starts one server for the whole run: tiny models in its model folders (extra_model_paths), this repo as a
custom node, temporary input/output/user folders, previews on. The helpers below build and run prompts on it.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_client import Comfy, to_api

ROOT = Path(__file__).resolve().parents[1]
SMALL = (192, 128)  # width, height of the test images
MASKED = (64, 32, 128, 96)  # x0, y0, x1, y1 of the inpainted rectangle (on the 32 px latent grid)
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
T2I = ROOT / "workflows" / "sana_text_to_image_1024.json"
#: ComfyUI model folder types the server is given (a test may drop more files into them while it runs).
MODEL_FOLDERS = ("diffusion_models", "unet", "checkpoints", "text_encoders", "clip", "vae", "vae_approx",
                 "upscale_models", "loras", "controlnet")
_setup: tuple[subprocess.Popen, Path] | None = None


def _snapshot() -> Path | None:
    """The folder holding the ComfyUI snapshot's setup.sh, if one is at hand."""
    for folder in (os.environ.get("SANA_COMFYUI_SNAPSHOT"), ROOT.parent / "shared" / "comfyui"):
        if folder and (Path(folder) / "setup.sh").is_file():
            return Path(folder)
    return None


def start_setup() -> None:
    """Build ComfyUI from the snapshot in the background (reused when already built), unless COMFYUI_PATH is set."""
    global _setup
    snapshot = _snapshot()
    if _setup is not None or os.environ.get("COMFYUI_PATH") or snapshot is None:
        return
    dest = ROOT / ".comfyui"
    dest.mkdir(exist_ok=True)
    log = dest / f"setup{os.environ.get('PYTEST_XDIST_WORKER', '')}.log"
    # one build at a time (xdist workers each start one; the later ones reuse it), then the pack's own runtime
    # requirements in ComfyUI's venv, as a user installs them
    build = (f'bash "{snapshot / "setup.sh"}" "{dest}" "{dest / "venv"}" && '
             f'"{dest / "venv" / "bin" / "pip"}" install -q -r "{ROOT / "requirements.txt"}"')
    with open(log, "w") as out:
        proc = subprocess.Popen(["flock", str(dest / "setup.lock"), "bash", "-c", build], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    _setup = (proc, log)


def unavailable(reason: str) -> None:
    """Skip a host test for something missing on this machine; under CI (CI=true) that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def comfyui() -> tuple[Path, str]:
    """(ComfyUI folder, its Python): from COMFYUI_PATH, or the snapshot's build (waited for); skips without either."""
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]), os.environ.get("COMFYUI_PYTHON", sys.executable)
    start_setup()
    if _setup is None:
        unavailable("no ComfyUI for the end-to-end tests: set COMFYUI_PATH to a ComfyUI checkout, or put the "
                    "snapshot (setup.sh) in ../shared/comfyui or SANA_COMFYUI_SNAPSHOT")
    proc, log = _setup
    if proc.wait() != 0:
        pytest.fail(f"building ComfyUI from the snapshot failed:\n{log.read_text()[-3000:]}")
    found = dict(re.findall(r"^(COMFYUI_PATH|COMFYUI_PYTHON)=(.*)$", log.read_text(), re.M))
    return Path(found["COMFYUI_PATH"]), found["COMFYUI_PYTHON"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_upscaler(path: Path) -> None:
    """A random 2x RealESRGAN-Compact (the layout spandrel recognises): conv, PReLU, conv, PReLU, conv."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {"body.0.weight": torch.randn(8, 3, 3, 3, generator=g) * 0.1, "body.0.bias": torch.zeros(8),
          "body.1.weight": torch.full((8,), 0.2), "body.2.weight": torch.randn(8, 8, 3, 3, generator=g) * 0.1,
          "body.2.bias": torch.zeros(8), "body.3.weight": torch.full((8,), 0.2),
          "body.4.weight": torch.randn(12, 8, 3, 3, generator=g) * 0.1, "body.4.bias": torch.zeros(12)}
    save_file(sd, str(path))


def write_models(root: Path) -> dict[str, Path]:
    """Tiny Sana pipelines, ControlNets, wrong files, LoRAs and test images under `root` (models/, input/);
    returns the pipeline folders {"sana", "sprint", "deep"}."""
    from PIL import Image
    from safetensors.torch import save_file

    from sana_core.checkpoints.dit import load_dit, save_dit
    from sana_core.controlnet import SanaControlNet
    from sana_core.tiny import randomize_, write_tiny_controlnet, write_tiny_gemma, write_tiny_pipeline
    from sana_core.train.lora import add_lora, save_lora

    models = root / "models"
    for sub in MODEL_FOLDERS:
        (models / sub).mkdir(parents=True)
    sana = write_tiny_pipeline(root / "sana_e2e_tiny", seed=21)
    sprint = write_tiny_pipeline(root / "sana_e2e_sprint", seed=22, sprint=True)
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (models / sub / "sana_e2e_tiny").symlink_to(sana)
    (models / "diffusion_models" / "sana_e2e_sprint").symlink_to(sprint)
    deep = write_tiny_pipeline(root / "sana_e2e_deep", seed=23, depth=8)  # room for a ControlNet's 7 blocks
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (models / sub / "sana_e2e_deep").symlink_to(deep)
    write_tiny_controlnet(models / "controlnet" / "sana_e2e_ControlNet_HED.pth", deep / "transformer", seed=24)
    write_tiny_controlnet(models / "controlnet" / "sana_e2e_ControlNet_B.pth", deep / "transformer", seed=25)
    save_file({"input_hint_block.0.weight": torch.zeros(16, 3, 3, 3), "zero_convs.0.0.weight": torch.zeros(4, 4)},
              str(models / "controlnet" / "sana_e2e_sd15_controlnet.safetensors"))
    wide = randomize_(SanaControlNet(replace(load_dit(deep).cfg, width=96, cross_heads=3)), 26)
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()},
              str(models / "controlnet" / "sana_e2e_ControlNet_wide.safetensors"))
    (models / "text_encoders" / "sana_e2e_sprint").symlink_to(sprint)
    write_tiny_gemma(root / "gemma", seed=3, single_file=models / "diffusion_models" / "sana_e2e_gemma_in_dit_slot.safetensors")
    save_file({"input_blocks.0.0.weight": torch.zeros(4, 4), "middle_block.0.in_layers.0.weight": torch.zeros(4)},
              str(models / "diffusion_models" / "sana_e2e_sdxl_unet.safetensors"))
    tiny_upscaler(models / "upscale_models" / "sana_e2e_compact_x2.safetensors")
    save_dit(randomize_(load_dit(sana), 31), models / "diffusion_models" / "sana_e2e_other.safetensors")
    overflowing = load_dit(sana)
    with torch.no_grad():
        overflowing.final_layer.linear.weight.mul_(1e5)  # its output overflows float16 (65504)
    save_dit(overflowing, models / "diffusion_models" / "sana_e2e_fp16_overflow.safetensors", layout="nvlabs",
             dtype=torch.float16)
    g = torch.Generator().manual_seed(1)  # a LoRA on the fused qkv of block 0, in ComfyUI's generic key layout
    save_file({"diffusion_model.blocks.0.attn.qkv.lora_down.weight": torch.randn(4, 64, generator=g),
               "diffusion_model.blocks.0.attn.qkv.lora_up.weight": torch.randn(192, 4, generator=g)},
              str(models / "loras" / "sana_e2e_lora_comfy_keys.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn1.to_k.lora_A.weight": torch.randn(4, 64, generator=g),
               "transformer.transformer_blocks.0.attn1.to_k.lora_B.weight": torch.randn(64, 4, generator=g),
               "transformer.transformer_blocks.1.attn2.to_v.lora_A.weight": torch.randn(4, 64, generator=g),
               "transformer.transformer_blocks.1.attn2.to_v.lora_B.weight": torch.randn(64, 4, generator=g)},
              str(models / "loras" / "sana_e2e_lora_diffusers.safetensors"))
    save_file({"lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, 64, generator=g),
               "lora_unet_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(64, 4, generator=g),
               "lora_unet_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(2.0)},
              str(models / "loras" / "sana_e2e_lora_kohya.safetensors"))
    save_file({"blocks.1.cross_attn.q_linear.lora_A.weight": torch.randn(4, 64, generator=g),
               "blocks.1.cross_attn.q_linear.lora_B.weight": torch.randn(64, 4, generator=g)},
              str(models / "loras" / "sana_e2e_lora_nvlabs.safetensors"))
    (models / "loras" / "sana_e2e_empty.safetensors").write_bytes(b"")
    trained = load_dit(sana)  # a LoRA as our trainer writes it (diffusers names, fused q/k/v as 3 LoRAs)
    with torch.no_grad():
        for adapter in add_lora(trained, rank=4, seed=5):
            for up in adapter.ups:
                up.normal_(std=0.3, generator=g)
    save_lora(trained, models / "loras" / "sana_e2e_trained_lora.safetensors")
    (root / "input").mkdir()
    gradient = np.linspace(0, 255, SMALL[0] * SMALL[1] * 3).reshape(SMALL[1], SMALL[0], 3).astype(np.uint8)
    Image.fromarray(gradient).save(root / "input" / "example.png")
    alpha = np.full(gradient.shape[:2], 255, np.uint8)
    alpha[MASKED[1]:MASKED[3], MASKED[0]:MASKED[2]] = 0  # LoadImage's MASK is 1 where alpha is 0
    Image.fromarray(np.dstack([gradient, alpha])).save(root / "input" / "sana_e2e_masked.png")
    lines = np.zeros((SMALL[1], SMALL[0], 3), np.uint8)  # a scribble hint at the test size: white lines on black
    lines[20:26, 10:180], lines[30:120, 90:96] = 255, 255
    Image.fromarray(lines).save(root / "input" / "sana_e2e_scribble.png")
    return {"sana": sana, "sprint": sprint, "deep": deep}


def serve(root: Path):
    """Start ComfyUI on a free port over `root` (models written by `write_models`); yields a `Comfy` client with
    .root (its comfy.log is the server's console), .sana/.sprint/.deep (pipeline folders), .info (/object_info)."""
    folders = write_models(root)  # while a background ComfyUI build may still be running
    comfy, python = comfyui()
    (root / "user").mkdir()
    nodes = root / "custom_nodes"
    nodes.mkdir()
    installed = [p for p in (comfy / "custom_nodes").iterdir() if p.resolve() == ROOT]
    if not installed:
        (nodes / "comfyui-sana").symlink_to(ROOT)
    config = root / "extra_model_paths.yaml"
    config.write_text(json.dumps({"sana_tests": {
        "base_path": str(root), **{sub: f"models/{sub}" for sub in MODEL_FOLDERS}, "custom_nodes": "custom_nodes"}}))
    port = _free_port()
    log = open(root / "comfy.log", "w")
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1",
         "--port", str(port), "--extra-model-paths-config", str(config), "--output-directory", str(root / "output"),
         "--input-directory", str(root / "input"), "--user-directory", str(root / "user"),
         "--preview-method", "auto"],
        cwd=comfy, stdout=log, stderr=subprocess.STDOUT)
    client = Comfy(f"http://127.0.0.1:{port}")
    deadline = time.time() + 600
    while True:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"ComfyUI did not start: {(root / 'comfy.log').read_text()[-3000:]}")
        try:
            code, info = client.request("GET", "/object_info/SanaSampler")
        except OSError:
            code = None
        if code == 200:
            if not info:  # the server is up without our nodes: the pack failed to import
                proc.kill()
                pytest.fail(f"ComfyUI started without the Sana nodes: {(root / 'comfy.log').read_text()[-3000:]}")
            break
        time.sleep(0.5)
    client.root, client.sana, client.sprint, client.deep = root, *folders.values()
    client.info = client.request("GET", "/object_info")[1]
    yield client
    proc.terminate()
    proc.wait(30)
    log.close()


def saved_images(server, entry: dict) -> dict[str, list[np.ndarray]]:
    """Saved images per node id (SaveImage outputs), as uint8 arrays."""
    from PIL import Image

    out = {}
    for node_id, output in entry["outputs"].items():
        files = [server.root / "output" / im["subfolder"] / im["filename"] for im in output.get("images", [])
                 if im["type"] == "output"]
        if files:
            out[node_id] = [np.asarray(Image.open(f)) for f in files]
    return out


def prepare(server, workflow: Path, steps: int = 3) -> dict:
    """A bundled workflow converted to API format, with tiny models, small images and few steps."""
    prompt = to_api(json.loads(workflow.read_text()), server.info)
    sprint, control = "sprint" in workflow.stem, "controlnet" in workflow.stem
    tiny = "sana_e2e_deep/" if control else "sana_e2e_tiny/"
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "SanaCheckpointLoader":
            inputs["ckpt_name"] = ("sana_e2e_ControlNet_HED.pth" if control else
                                   "sana_e2e_sprint/" if sprint else "sana_e2e_tiny/")
        elif kind == "SanaControlNetLoader":
            inputs["control_net_name"] = "sana_e2e_ControlNet_HED.pth"
        elif kind in ("SanaGemmaLoader", "SanaDCAELoader"):
            inputs["text_encoder" if kind == "SanaGemmaLoader" else "vae_name"] = tiny
        elif kind == "SanaFolderLoader":
            inputs["folder"] = "sana_e2e_tiny/"
        elif kind == "SolidMask":  # the inpaint workflow's mask: the MASKED rectangle of a SMALL image
            x0, y0, x1, y1 = MASKED
            inputs["width"], inputs["height"] = SMALL if inputs["value"] == 0 else (x1 - x0, y1 - y0)
        elif kind == "MaskComposite":
            inputs["x"], inputs["y"] = MASKED[:2]
        elif kind in ("SanaEmptyLatentImage", "ImageScale"):
            inputs["width"], inputs["height"] = SMALL
        elif kind in ("SanaSampler", "KSampler", "SanaScheduler") and not sprint:
            inputs["steps"] = steps
            if kind == "SanaSampler":
                inputs["pag_layers"] = "1"  # the tiny DiTs have 2 (8) blocks
        elif kind == "UpscaleModelLoader":
            inputs["model_name"] = "sana_e2e_compact_x2.safetensors"
        elif kind == "SanaDCAEDecode":
            inputs["tile_size"], inputs["overlap"] = 128, 64
        elif kind == "SanaPAG":
            inputs["layers"] = "1"  # the tiny DiT has 2 blocks
    return prompt


def prompt_texts(prompt: dict) -> dict[str, str]:
    """{"positive": text, "negative": text} of an API prompt: the text encoders wired (through any conditioning
    nodes) to its sampler's or guider's positive and negative inputs."""
    out = {}
    for n in prompt.values():
        for side in ("positive", "negative"):
            link = n["inputs"].get(side)
            while isinstance(link, list):
                src = prompt[link[0]]["inputs"]
                if "text" in src:
                    out[side] = src["text"]
                    break
                link = src.get(("positive", "negative")[link[1]] if "positive" in src else "conditioning")
    return out


def node(prompt: dict, kind: str) -> str:
    """The id of the first node of type `kind` in an API prompt."""
    return next(k for k, n in prompt.items() if n["class_type"] == kind)


def add(prompt: dict, node_id: str, kind: str, **inputs) -> list:
    """Add a node to an API prompt; returns the link to its first output."""
    prompt[node_id] = {"class_type": kind, "inputs": inputs}
    return [node_id, 0]


def save(prompt: dict, name: str, image: list) -> None:
    """A SaveImage node whose image `run_images` returns under `name`."""
    add(prompt, f"save_{name}", "SaveImage", images=image, filename_prefix=name)


def run_images(server, prompt: dict) -> dict[str, np.ndarray]:
    """Run a prompt that must succeed; its saved images by SaveImage name (int16 arrays)."""
    from comfy_client import error_of

    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", (error_of(entry) or {}).get("exception_message")
    return {k.removeprefix("save_"): v[0].astype(np.int16) for k, v in saved_images(server, entry).items()}
