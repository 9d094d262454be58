"""Latent nodes: an empty Sana latent, and the DC-AE decode/encode between LATENT and IMAGE with Sana's tiling
options (core VAEDecode/VAEEncode work on our VAE too)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from comfy_api.latest import io

from ..sana_core.resolutions import presets

from .common import CATEGORY, check_widgets, wrap_once
from .latent_sizes import CORE, RATIO, RATIO_KEY

PRESETS = {"custom": None, **presets()}
TILING = {"auto": None, "on": True, "off": False}  # the widget's choices -> DCAE's `tiled` argument
TILING_TIP = ("auto: tiles only when the whole image would not fit in memory (after asking ComfyUI to free room) "
              "or after an out-of-memory error; on: always tiles; off: never")


#: Channels of the empty latents of 1/8-scale models (SD1.x/SDXL: 4, SD3/Flux: 16) that a Sana model resizes.
EIGHTH_SCALE_CHANNELS = (4, 16)


def install() -> None:
    """Empty latents from core's 1/8-scale nodes (EmptyLatentImage, EmptySD3LatentImage) under any sampler of a
    Sana model become the Sana latent of the same pixel size, as newer cores do themselves (their samplers resize
    an empty latent to the model's `spacial_downscale_ratio`); 0.3.64's `fix_empty_latent_channels` only repeats
    channels, which made 4x the size asked. Wraps that function once, on such cores only."""
    import inspect

    import comfy.sample

    if RATIO_KEY not in inspect.signature(comfy.sample.fix_empty_latent_channels).parameters:  # newer cores resize
        wrap_once(comfy.sample, "fix_empty_latent_channels", _sana_sized_empty)


def _sana_sized_empty(core: Callable) -> Callable:
    """0.3.64's `fix_empty_latent_channels` giving a Sana model the Sana latent of an empty 1/8 latent's size."""
    import logging

    from .model import SanaLatentFormat

    def fix_empty_latent_channels(model, latent_image, *args, **kwargs):
        fmt = model.get_model_object("latent_format")
        if (isinstance(fmt, SanaLatentFormat) and latent_image.ndim == 4
                and latent_image.shape[1] != fmt.latent_channels and torch.count_nonzero(latent_image) == 0):
            b, c, h, w = latent_image.shape
            if c not in EIGHTH_SCALE_CHANNELS or h * CORE % RATIO or w * CORE % RATIO:
                raise ValueError(f"the empty latent ({c} channels, {w}x{h}) is not one Sana can take: use "
                                 "SanaEmptyLatentImage (or EmptyLatentImage with a width and height that are "
                                 "multiples of 32)")
            logging.getLogger(__name__).info("Sana: an empty %d-channel latent of %dx%d px becomes a Sana latent "
                                             "of the same size", c, w * CORE, h * CORE)
            latent_image = latent_image.new_zeros(b, fmt.latent_channels, h * CORE // RATIO, w * CORE // RATIO)
        return core(model, latent_image, *args, **kwargs)

    return fix_empty_latent_channels


def sana_vae(vae, node: str):
    """The VAE input of a Sana node, which must be our DC-AE (SanaDCAELoader / SanaFolderLoader)."""
    from .vae import SanaVAE

    if not isinstance(vae, SanaVAE):
        raise ValueError(f"{node}: the VAE is not a Sana DC-AE ({type(vae).__name__}); load it with SanaDCAELoader "
                         "(core VAEDecode/VAEEncode take other VAEs)")
    return vae


class SanaEmptyLatentImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaEmptyLatentImage", display_name="Empty Sana Latent Image", category=CATEGORY,
            description="An empty 32-channel latent at 1/32 of the image size. Width and height are multiples of 32; "
                        "a preset (aspect ratios at about 512^2/1024^2/2048^2/4096^2 pixels, multiples of 32; not "
                        "NVlabs' training buckets) overrides them.",
            inputs=[io.Int.Input("width", default=1024, min=32, max=8192, step=32,
                                 tooltip="pixels, a multiple of 32 (the latent is 1/32 of it)"),
                    io.Int.Input("height", default=1024, min=32, max=8192, step=32,
                                 tooltip="pixels, a multiple of 32 (the latent is 1/32 of it)"),
                    io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="images generated together"),
                    io.Combo.Input("preset", options=list(PRESETS), default="custom", optional=True,
                                   tooltip="aspect-ratio presets of about 512^2 to 4096^2 pixels (not NVlabs' "
                                           "training buckets); custom uses width and height")],
            outputs=[io.Latent.Output(tooltip="zeros of shape (batch, 32, height/32, width/32)")])

    @classmethod
    def validate_inputs(cls, width: int | None = None, height: int | None = None) -> bool | str:
        checked = check_widgets(cls, {"width": width, "height": height})
        if checked is not True:
            return checked
        if any(isinstance(v, int) and v % 32 for v in (width, height)):
            return (f"width and height must be multiples of 32 (got {width}x{height}); "
                    "Sana's latent is 1/32 of the image")
        return True

    @classmethod
    def execute(cls, width: int, height: int, batch_size: int, preset: str = "custom") -> io.NodeOutput:
        import comfy.model_management as mm

        width, height = PRESETS[preset] or (width, height)
        samples = torch.zeros(batch_size, 32, height // 32, width // 32, device=mm.intermediate_device())
        return io.NodeOutput({"samples": samples, RATIO_KEY: RATIO})


class SanaDCAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaDCAEDecode", display_name="Sana DC-AE Decode", category=CATEGORY,
            description="Decodes a Sana LATENT into an IMAGE with the DC-AE (a VAE from SanaDCAELoader). Tiling: auto "
                        "tiles when the image would not fit in memory (or after an out-of-memory error); on forces it, "
                        "off forbids it. tile_size is the largest tile (0: the largest that fits); tiles are made as "
                        "small as their count allows. Shows progress and can be cancelled between blocks. A float16 "
                        "DC-AE that overflows is switched to bfloat16 with a warning.",
            inputs=[io.Latent.Input("samples", tooltip="a Sana latent"),
                    io.Vae.Input("dcae", tooltip="the DC-AE (SanaDCAELoader)"),
                    io.Combo.Input("tiling", options=list(TILING), default="auto", tooltip=TILING_TIP),
                    io.Int.Input("tile_size", default=0, min=0, max=8192, step=32,
                                 tooltip="largest tile in pixels; 0: the largest that fits the free memory (<= 2048)"),
                    io.Int.Input("overlap", default=256, min=0, max=4096, step=32,
                                 tooltip="pixels neighbouring tiles share (blended)")],
            outputs=[io.Image.Output(tooltip="the decoded images, 0..1")])

    @classmethod
    def validate_inputs(cls, tile_size: int | None = None, overlap: int | None = None) -> bool | str:
        checked = check_widgets(cls, {"tile_size": tile_size, "overlap": overlap})
        numbers = all(isinstance(v, int) for v in (tile_size, overlap))
        if checked is True and numbers and tile_size and (tile_size < 64 or overlap >= tile_size):
            return f"tile_size ({tile_size}) must be 0 (automatic) or >= 64 and larger than overlap ({overlap})"
        return checked

    @classmethod
    def execute(cls, samples: dict, dcae, tiling: str, tile_size: int, overlap: int) -> io.NodeOutput:
        vae = sana_vae(dcae, "SanaDCAEDecode")
        return io.NodeOutput(vae.decode(samples["samples"], tiled=TILING[tiling], tile_size=tile_size or None,
                                        overlap=overlap))


class SanaDCAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaDCAEEncode", display_name="Sana DC-AE Encode", category=CATEGORY,
            description="Encodes an IMAGE into a Sana LATENT (image-to-image with denoise < 1, inpainting with a "
                        "noise mask). Images are center-cropped to multiples of 32.",
            inputs=[io.Image.Input("pixels", tooltip="images to encode"),
                    io.Vae.Input("dcae", tooltip="the DC-AE (SanaDCAELoader)"),
                    io.Combo.Input("tiling", options=list(TILING), default="auto", tooltip=TILING_TIP)],
            outputs=[io.Latent.Output(tooltip="raw DC-AE latents (batch, 32, H/32, W/32)")])

    @classmethod
    def execute(cls, pixels: torch.Tensor, dcae, tiling: str) -> io.NodeOutput:
        vae = sana_vae(dcae, "SanaDCAEEncode")
        return io.NodeOutput({"samples": vae.encode(pixels, tiled=TILING[tiling]), RATIO_KEY: RATIO})
