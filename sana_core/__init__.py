"""Sana text-to-image in pure PyTorch: DC-AE, linear DiT, Gemma-2 text encoder, flow samplers.

Never imports ComfyUI. Heavy submodules are imported lazily by their users.
"""
__version__ = "0.1.0"
