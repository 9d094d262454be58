"""The pipeline's image I/O, one argument order and one value range: pictures, control images and masks in from
what users hold (a file path, a PIL image, a tensor, a list of them), as float32 in 0..1 at the size asked
(resized to cover it and centre-cropped, as NVlabs' app prepares its images); images out as PIL images and PNG
files that carry their settings.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .resolutions import resize_and_crop

if TYPE_CHECKING:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

ImageInput = Any  # str | Path | PIL.Image.Image | torch.Tensor, or a list of them


def load_image(image: ImageInput, *, height: int, width: int, name: str = "image") -> torch.Tensor:
    """A picture -> (N, 3, height, width) float32 in 0..1: a file path, a PIL image, a tensor (N, 3, h, w) or
    (3, h, w) in 0..1 (a grey (N, 1, h, w) one is repeated to RGB), or a list of these; any size, resized
    (bicubic, antialiased, as PIL's) to cover height x width and centre-cropped. `name` is the argument named in
    errors."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError(f"{name}: an empty list")
        return torch.cat([load_image(i, height=height, width=width, name=name) for i in image])
    image = _tensor(image, name, mask=False)
    if image.ndim not in (3, 4) or image.shape[-3] not in (1, 3):
        raise ValueError(f"{name}: expected a PIL image, an image file path or a (N, 3, H, W) tensor in 0..1, got a "
                         f"tensor of shape {tuple(image.shape)}")
    image = image.float().reshape(-1, *image.shape[-3:]).expand(-1, 3, -1, -1)
    return resize_and_crop(image, height, width, mode="bicubic").clamp(0, 1)


def load_mask(mask: ImageInput, *, height: int, width: int, name: str = "mask_image") -> torch.Tensor:
    """An inpainting mask -> (N, height, width) float32 in 0..1, 1 (white) = repaint: a file path or PIL image
    (its luminance; its alpha inverted when it has one: transparent = repaint), a tensor (N, H, W), (H, W) or
    (N, 1, H, W) in 0..1, or a list of these; resized (bilinear) to cover height x width and centre-cropped."""
    if isinstance(mask, (list, tuple)):
        if not mask:
            raise ValueError(f"{name}: an empty list")
        return torch.cat([load_mask(m, height=height, width=width, name=name) for m in mask])
    mask = _tensor(mask, name, mask=True)
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim not in (2, 3):
        raise ValueError(f"{name}: expected (N, H, W) or (H, W) in 0..1, got a tensor of shape {tuple(mask.shape)}")
    mask = mask.float().reshape(-1, 1, *mask.shape[-2:])
    return resize_and_crop(mask, height, width).clamp(0, 1)[:, 0]


def _tensor(image: Any, name: str, mask: bool) -> torch.Tensor:
    """A path or PIL image as a tensor in 0..1 ((3, h, w), or (h, w) for a mask); a tensor as it is."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                image = ImageOps.exif_transpose(im)
                image.load()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{name} {str(image)!r}: not a readable image file ({e})") from e
    if isinstance(image, Image.Image):
        if mask:
            grey = image.getchannel("A").point(lambda a: 255 - a) if "A" in image.getbands() else image.convert("L")
            return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{name}: expected a file path, a PIL image or a tensor, got {type(image).__name__}")
    return image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images (B, 3, H, W) in 0..1 -> B PIL RGB images (rounded to 8 bits)."""
    from PIL import Image

    arrays = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def png_metadata(settings: dict[str, Any]) -> PngInfo:
    """PNG text chunks: the prompt, and every setting as JSON under "sana"."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", str(settings.get("prompt", "")))
    info.add_text("sana", json.dumps(settings, default=str))
    return info


def save_images(images: Sequence[Image.Image], folder: str | Path, settings: Sequence[dict[str, Any]] | None = None,
                names: Sequence[str] | None = None) -> list[Path]:
    """Write PIL images as PNGs into `folder` (created), with each one's settings in its PNG text chunks
    (`png_metadata`). Existing files are never overwritten: names get a counter instead."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        stem = names[i] if names else f"sana_{i:05d}"
        path, k = folder / f"{stem}.png", 1
        while path.exists():
            path, k = folder / f"{stem}_{k}.png", k + 1
        image.save(path, pnginfo=png_metadata(settings[i] if settings else {}))
        paths.append(path)
    return paths
