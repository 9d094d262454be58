"""Sana's image sizes: multiples of 32 (one latent pixel = 32 x 32 image pixels) near a base area."""
from __future__ import annotations

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
