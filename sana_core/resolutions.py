"""Sana's image sizes: multiples of 32 (one latent pixel = 32 x 32 image pixels) near a base area."""
from __future__ import annotations

import torch

#: Aspect ratios (width:height) offered as presets, square first.
RATIOS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (21, 9), (9, 21), (2, 1), (1, 2))


def snap(size: float) -> int:
    """The nearest positive multiple of 32."""
    return max(32, int(round(size / 32)) * 32)


def preset_size(base: int, ratio: tuple[int, int]) -> tuple[int, int]:
    """(width, height), multiples of 32, of about base x base pixels at width:height = ratio."""
    r = (ratio[0] / ratio[1]) ** 0.5
    return snap(base * r), snap(base / r)


def presets(bases: tuple[int, ...] = (512, 1024, 2048, 4096)) -> dict[str, tuple[int, int]]:
    """Named presets such as "1024: 1152x896 (4:3)" -> (1152, 896)."""
    out = {}
    for base in bases:
        for ratio in RATIOS:
            w, h = preset_size(base, ratio)
            out[f"{base}: {w}x{h} ({ratio[0]}:{ratio[1]})"] = (w, h)
    return out


#: NVlabs' training buckets: aspect ratio (height / width) -> (height, width) in units of base / 16 pixels, the
#: same for the 512 and 1024 px models; the 2K and 4K models have seven more (`BUCKETS_2K`).
BUCKETS = ("0.25:8x32 0.28:8x29 0.32:9x28 0.33:9x27 0.35:9x26 0.4:10x25 0.42:10x24 0.48:11x23 0.5:11x22 0.52:11x21 "
           "0.57:12x21 0.6:12x20 0.68:13x19 0.72:13x18 0.78:14x18 0.82:14x17 0.88:15x17 0.94:15x16 1.0:16x16 "
           "1.07:16x15 1.13:17x15 1.21:17x14 1.29:18x14 1.38:18x13 1.46:19x13 1.67:20x12 1.75:21x12 2.0:22x11 "
           "2.09:23x11 2.4:24x10 2.5:25x10 3.0:27x9 4.0:32x8")
BUCKETS_2K = "0.26:8x31 0.27:8x30 2.89:26x9 3.11:28x9 3.62:29x8 3.75:30x8 3.88:31x8"


def buckets(base: int) -> dict[float, tuple[int, int]]:
    """The size buckets of a model trained at `base` px (512, 1024, 2048, 4096): ratio -> (height, width) px."""
    unit, text = base // 16, BUCKETS + (" " + BUCKETS_2K if base >= 2048 else "")
    table = {}
    for entry in text.split():
        ratio, size = entry.split(":")
        h, w = size.split("x")
        table[float(ratio)] = (int(h) * unit, int(w) * unit)
    return dict(sorted(table.items()))


def bin_size(height: int, width: int, base: int) -> tuple[int, int]:
    """(height, width) of the bucket whose aspect ratio is nearest height / width (the first on a tie), as
    diffusers' `use_resolution_binning`."""
    table = buckets(base)
    ratio = min(table, key=lambda r: abs(r - height / width))
    return table[ratio]


def resize_and_crop(images: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """Images (B, C, h, w) scaled to cover height x width, then centre-cropped to it. mode "bilinear" (no
    antialiasing: diffusers' resolution binning) or "bicubic" (antialiased, as PIL's bicubic resize that NVlabs'
    ControlNet app applies to control images)."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    scale = max(height / h, width / w)
    rh, rw = int(h * scale), int(w * scale)
    images = torch.nn.functional.interpolate(images, size=(rh, rw), mode=mode, align_corners=False,
                                             antialias=mode == "bicubic")
    top, left = (rh - height) // 2, (rw - width) // 2
    return images[..., top:top + height, left:left + width]
