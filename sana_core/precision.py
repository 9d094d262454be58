"""Where float16 is not enough: the dtype a float16 model falls back to when its activations overflow."""
from __future__ import annotations

import torch


def fp16_fallback_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 (the size of float16 with float32's range), or float32 on a CUDA GPU without bfloat16."""
    device = torch.device(device)
    return torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float32
