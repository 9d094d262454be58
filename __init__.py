"""ComfyUI entry point of the Sana pack (V3 API). Imports nothing heavy at load time.

The engine lives in `sana_core/` (pure PyTorch, usable without ComfyUI); `nodes/` adapts it to ComfyUI.
"""
import os
import sys

WEB_DIRECTORY = "./js"

# sana_core is imported by absolute name from the nodes; make this folder importable.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)


async def comfy_entrypoint():
    from .nodes import SanaExtension

    return SanaExtension()
