"""ComfyUI entry point of the Sana pack (V3 API). Imports nothing heavy at load time.

The engine lives in `sana_core/` (pure PyTorch, usable without ComfyUI); `nodes/` adapts it to ComfyUI and imports
it relatively (`..sana_core`), so the pack never touches `sys.path`: two copies of it, or another package named
`sana_core`, cannot shadow each other.
"""
WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    from .nodes import SanaExtension

    return SanaExtension()
