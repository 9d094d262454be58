"""Live previews without the decoder: a linear map from the DiT's (scaled) latent to RGB, fitted to a DC-AE.

ComfyUI's Latent2RGB preview computes rgb = latent @ factors + bias per latent pixel, in [-1, 1]. The map is
fitted by least squares on images the encoder sees: smooth random colour fields whose 32 x 32 pixel means are
the targets.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def colour_fields(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n smooth random colour images (n, 3, size, size) in [-1, 1]: low-resolution noise, upsampled."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def fit_latent_rgb(encode: Callable[[torch.Tensor], torch.Tensor], factor: int = 32, n: int = 8, size: int = 256,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                   ) -> tuple[list[list[float]], list[float]]:
    """Fit rgb ~ latent @ W + b. encode: images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f).

    Returns (W as C rows of [r, g, b], b as [r, g, b]), the form of ComfyUI's latent_rgb_factors(_bias).
    """
    images = colour_fields(n, size)
    latents = encode(images.to(device, dtype)).float().cpu()                     # (n, C, h, w)
    targets = F.avg_pool2d(images, factor)                                      # (n, 3, h, w)
    x = latents.movedim(1, -1).reshape(-1, latents.shape[1])                    # (N, C)
    y = targets.movedim(1, -1).reshape(-1, 3)                                   # (N, 3)
    x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    solution = torch.linalg.lstsq(x1.double(), y.double()).solution.float()      # (C + 1, 3)
    return solution[:-1].tolist(), solution[-1].tolist()
