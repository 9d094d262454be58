"""Core's latent nodes that take sizes in pixels and divide them by 8 themselves, on Sana latents (1/32 of the
image): LatentUpscale, LatentCrop, LatentComposite and LatentCompositeMasked made 4x the size asked (or cropped
and pasted at 4x the offsets). Core 0.3.64 and 0.38 alike hard-code the 8 in these nodes (0.38 reads the
`downscale_ratio_spacial` a LATENT may carry only when a sampler resizes an empty latent), so `install` wraps
them once: on a Sana latent each pixel size or offset is handed to core's own code as the value it turns into
pixels // 32 latent pixels, with a console warning naming the node where that is not the size asked. Other
latents go to core unchanged.
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable

import torch

from .common import wrap_once
from .model import SanaLatentFormat

log = logging.getLogger(__name__)
RATIO = SanaLatentFormat.spacial_downscale_ratio  # 32 image pixels per latent pixel (the DC-AE f32c32)
RATIO_KEY = "downscale_ratio_spacial"  # the LATENT key newer cores read for a latent's ratio
CORE = 8  # the image pixels per latent pixel these core nodes assume

#: node id -> (its LATENT inputs that tell a Sana latent, its inputs in pixels, the smallest size core makes in
#: its own pixels: LatentUpscale makes at least 64 px, i.e. 8 latent pixels)
PIXEL_NODES: dict[str, tuple[tuple[str, ...], tuple[str, ...], int]] = {
    "LatentUpscale": (("samples",), ("width", "height"), 64),
    "LatentCrop": (("samples",), ("width", "height", "x", "y"), 0),
    "LatentComposite": (("samples_to",), ("x", "y", "feather"), 0),
}


def is_sana_latent(latent: object) -> bool:
    """A LATENT dict holding Sana latents: it says ratio 32 (`RATIO_KEY`; our latent nodes write it), or it says
    none and holds (B, 32, h, w) (core's VAEEncode and 0.38's samplers drop the key; no other 4-D image latent of
    core has 32 channels)."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        return False
    if RATIO_KEY in latent:
        return latent[RATIO_KEY] == RATIO
    return _sana_tensor(latent["samples"])


def _sana_tensor(samples: torch.Tensor) -> bool:
    return samples.ndim == 4 and samples.shape[1] == SanaLatentFormat.latent_channels


def core_pixels(node: str, name: str, pixels: int, least: int = 0) -> int:
    """`pixels` of a Sana latent as the value core's node (dividing by 8) turns into pixels // 32 latent pixels;
    a warning names the node and input when the result is not the size asked (not a multiple of 32, or under
    the `least` core makes, in core's pixels)."""
    value = pixels // RATIO * CORE
    made = max(value, least) // CORE * RATIO if pixels else 0
    if made != pixels:
        why = (f"core's node makes at least {least // CORE} latent pixels" if value < least else
               "Sana sizes are multiples of 32")
        log.warning("%s: %s=%d on a Sana latent (1/32 of the image) becomes %d px: %s", node, name, pixels, made,
                    why)
    return value


def install() -> None:
    """Wrap core's pixel-size latent nodes (`PIXEL_NODES` and LatentCompositeMasked's module function) once."""
    import nodes

    for node, (latents, sizes, least) in PIXEL_NODES.items():
        cls = nodes.NODE_CLASS_MAPPINGS.get(node)
        core = getattr(cls, getattr(cls, "FUNCTION", ""), None)
        if core is None:
            log.warning("Sana: core's %s has changed (no %s method); it is left as it is: on a Sana latent it makes "
                        "4x the size asked, use LatentUpscaleBy", node, getattr(cls, "FUNCTION", None))
        else:
            wrap_once(cls, cls.FUNCTION, functools.partial(_sized, node=node, latents=latents, sizes=sizes,
                                                           least=least))
    masked = nodes.NODE_CLASS_MAPPINGS.get("LatentCompositeMasked")
    module = sys.modules.get(getattr(masked, "__module__", ""))
    if module is not None and callable(getattr(module, "composite", None)):
        wrap_once(module, "composite", _masked_composite)


def _sized(core: Callable, node: str, latents: tuple[str, ...], sizes: tuple[str, ...], least: int) -> Callable:
    """Core's node method `core`, its pixel inputs `sizes` converted (`core_pixels`) when an input of `latents` is
    a Sana latent."""
    signature = inspect.signature(core)

    @functools.wraps(core)
    def method(*args: object, **kwargs: object) -> tuple:
        bound = signature.bind(*args, **kwargs)  # as called by ComfyUI (keywords) or another pack
        if any(is_sana_latent(bound.arguments.get(k)) for k in latents):
            for name in sizes:
                if name in bound.arguments:
                    bound.arguments[name] = core_pixels(node, name, bound.arguments[name],
                                                        least if name in ("width", "height") else 0)
        return core(*bound.args, **bound.kwargs)

    return method


def _masked_composite(core: Callable) -> Callable:
    """comfy_extras' `composite(destination, source, x, y, mask, multiplier, resize_source)` behind
    LatentCompositeMasked (multiplier 8; ImageCompositeMasked passes 1), x and y converted on Sana latents."""
    signature = inspect.signature(core)

    @functools.wraps(core)
    def composite(*args: object, **kwargs: object) -> torch.Tensor:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if bound.arguments["multiplier"] == CORE and _sana_tensor(bound.arguments["destination"]):
            for name in ("x", "y"):
                bound.arguments[name] = core_pixels("LatentCompositeMasked", name, bound.arguments[name])
        return core(*bound.args, **bound.kwargs)

    return composite
