"""Model choices for the loaders: weight files from ComfyUI's model folders plus model folders (diffusers/HF
layouts), which ComfyUI itself does not list."""
from __future__ import annotations

import os
from pathlib import Path

#: A folder is offered when it holds one of these (diffusers pipeline, component, HF model).
FOLDER_MARKERS = ("model_index.json", "config.json")


def model_folders(bases: list[str], max_depth: int = 3) -> list[str]:
    """Folders under `bases` that hold a model (a marker file), relative with '/' and a trailing '/'.

    A folder inside a found folder (a pipeline's `transformer/`) is listed too, so a component can be chosen.
    """
    found = set()
    for base in bases:
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            depth = Path(root).relative_to(base).parts
            dirs[:] = [d for d in dirs if not d.startswith(".")] if len(depth) < max_depth else []
            if depth and any(m in files for m in FOLDER_MARKERS):
                found.add("/".join(depth) + "/")
    return sorted(found)


def resolve(bases: list[str], name: str) -> str:
    """The full path of a listed file or folder; FileNotFoundError naming the folders searched."""
    for base in bases:
        path = os.path.join(base, name.rstrip("/"))
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"'{name}' is not in any of the model folders {bases}; put it there and refresh")
