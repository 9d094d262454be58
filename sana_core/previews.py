"""Live previews of a sampling run: TAESANA decodes at full size when its decoder is loaded, else a constant
linear latent-to-RGB map (one RGB pixel per latent pixel, 1/32 of the size).

The map works on the DiT's (scaled) latents: rgb = latent @ LATENT_RGB_FACTORS + LATENT_RGB_BIAS per latent
pixel, in [-1, 1] (ComfyUI's latent_rgb_factors / latent_rgb_factors_bias). It was fitted once, offline, by least
squares (`fit_latent_rgb`) on latents of the released TAESANA encoder (taesana_encoder.pth, which maps RGB into
the DC-AE 1.0/1.1 latent space) of `colour_fields(32, 256)`, whose 32 x 32 pixel means are the targets:
`fit_latent_rgb(load_taesana(encoder=...).encode, n=32, size=256)`. So nothing is fitted when a model loads.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .taesana import TAESANA

#: (32, 3): row k is the [r, g, b] weight of latent channel k.
LATENT_RGB_FACTORS = [
    [-0.0295, -0.0132,  0.0072],
    [ 0.0316, -0.0098, -0.0094],
    [-0.0101, -0.0080, -0.0464],
    [-0.0256, -0.0048, -0.0136],
    [-0.0069,  0.0017, -0.0131],
    [-0.0304, -0.0362,  0.0019],
    [-0.1675,  0.0219,  0.0717],
    [ 0.0087,  0.0280,  0.0324],
    [ 0.0025,  0.0199,  0.0013],
    [-0.0751, -0.0145,  0.0130],
    [ 0.0172,  0.0137, -0.0098],
    [ 0.0362,  0.0069, -0.0028],
    [ 0.0550,  0.0022,  0.0320],
    [ 0.0098,  0.0102,  0.0083],
    [ 0.0170,  0.0187, -0.0159],
    [-0.0318, -0.0490, -0.0013],
    [ 0.0132, -0.0268,  0.0209],
    [ 0.0165,  0.0167,  0.0148],
    [ 0.0132, -0.0156, -0.0142],
    [ 0.0213, -0.0297,  0.0085],
    [ 0.0025,  0.0141, -0.0746],
    [ 0.0087, -0.0005, -0.0100],
    [-0.0055, -0.0184, -0.0149],
    [ 0.0041, -0.0102,  0.0207],
    [-0.1564, -0.1849, -0.1648],
    [ 0.0396, -0.0039,  0.0565],
    [ 0.0028,  0.0832, -0.0165],
    [-0.0066,  0.0169, -0.0326],
    [-0.0039, -0.0042,  0.0371],
    [-0.0579,  0.0084,  0.0137],
    [ 0.0516, -0.0104, -0.0016],
    [ 0.0337, -0.0401, -0.0241],
]
LATENT_RGB_BIAS = [-0.0598, -0.1427, -0.1027]

Previewer = Callable[[torch.Tensor], torch.Tensor]


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


def linear_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 32, h, w) -> images (B, 3, h, w) in [0, 1] by the constant map."""
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32, device=latents.device)
    bias = torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("bkhw,kc->bchw", latents.float(), factors) + bias[None, :, None, None]
    return (rgb / 2 + 0.5).clamp(0, 1)


def previewer(decoder: TAESANA | None = None) -> Previewer:
    """Scaled latents (B, 32, h, w) -> preview images, float32 in [0, 1] on the CPU: (B, 3, 32h, 32w) TAESANA
    decodes with a decoder (run on its device and dtype), else (B, 3, h, w) from the linear map."""
    if decoder is None:
        return lambda latents: linear_rgb(latents).cpu()
    weight = next(decoder.parameters())

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        images = decoder.decode(latents.to(weight.device, weight.dtype))
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    return decode


def with_previews(callback: Callable[[dict[str, Any]], None], every: int,
                  preview: Previewer) -> Callable[[dict[str, Any]], None]:
    """A k-diffusion step callback whose dict, on every `every`-th step (steps counted from 1), also holds
    "preview": `preview` of the step's denoised latents ("denoised", the x0 prediction)."""
    if every < 1:
        raise ValueError(f"preview_every={every} must be at least 1")

    def wrapped(info: dict[str, Any]) -> None:
        if (info["i"] + 1) % every == 0:
            info = {**info, "preview": preview(info["denoised"])}
        callback(info)

    return wrapped


def save_previews(folder: str | Path, names: Sequence[str]) -> Callable[[dict[str, Any]], None]:
    """A step callback writing each "preview" it gets (from `with_previews`) as `folder/<name>_step<NNN>.png`, one
    file per image of the batch (`names`, in order; the step counted from 1)."""
    from PIL import Image

    folder = Path(folder)

    def save(info: dict[str, Any]) -> None:
        if "preview" not in info:
            return
        folder.mkdir(parents=True, exist_ok=True)
        arrays = (info["preview"].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        for name, array in zip(names, arrays, strict=True):
            Image.fromarray(array).save(folder / f"{name}_step{info['i'] + 1:03d}.png")

    return save
