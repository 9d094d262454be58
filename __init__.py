"""ComfyUI entry point of the Sana pack. Imports nothing heavy at load time.

The engine lives in `sana_core/` (pure PyTorch, usable without ComfyUI); `nodes/` adapts it to ComfyUI.
"""
WEB_DIRECTORY = "./js"
