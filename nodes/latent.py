"""Latent nodes: an empty Sana latent, and the DC-AE decode/encode between LATENT and IMAGE with Sana's tiling
options (core VAEDecode/VAEEncode work on our VAE too)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from sana_core.resolutions import presets

from .common import CATEGORY, check_widgets

PRESETS = {"custom": None, **presets()}
TILING = {"auto": None, "on": True, "off": False}  # the widget's choices -> DCAE's `tiled` argument
TILING_TIP = ("auto: tiles only when the whole image would not fit in memory (after asking ComfyUI to free room) "
              "or after an out-of-memory error; on: always tiles; off: never")


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
            outputs=[io.Latent.Output()])

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        checked = check_widgets(cls, values)
        if checked is not True:
            return checked
        width, height = values.get("width", 32), values.get("height", 32)
        if width % 32 or height % 32:
            return (f"width and height must be multiples of 32 (got {width}x{height}); "
                    "Sana's latent is 1/32 of the image")
        return True

    @classmethod
    def execute(cls, width: int, height: int, batch_size: int, preset: str = "custom") -> io.NodeOutput:
        import comfy.model_management as mm

        width, height = PRESETS[preset] or (width, height)
        samples = torch.zeros(batch_size, 32, height // 32, width // 32, device=mm.intermediate_device())
        return io.NodeOutput({"samples": samples})


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
            inputs=[io.Latent.Input("samples"), io.Vae.Input("dcae", tooltip="the DC-AE (SanaDCAELoader)"),
                    io.Combo.Input("tiling", options=list(TILING), default="auto", tooltip=TILING_TIP),
                    io.Int.Input("tile_size", default=0, min=0, max=8192, step=32,
                                 tooltip="largest tile in pixels; 0: the largest that fits the free memory (<= 2048)"),
                    io.Int.Input("overlap", default=256, min=0, max=4096, step=32,
                                 tooltip="pixels neighbouring tiles share (blended)")],
            outputs=[io.Image.Output()])

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        checked = check_widgets(cls, values)
        tile_size, overlap = values.get("tile_size", 0), values.get("overlap", 0)
        if checked is True and tile_size and (tile_size < 64 or overlap >= tile_size):
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
            inputs=[io.Image.Input("pixels"), io.Vae.Input("dcae", tooltip="the DC-AE (SanaDCAELoader)"),
                    io.Combo.Input("tiling", options=list(TILING), default="auto", tooltip=TILING_TIP)],
            outputs=[io.Latent.Output()])

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, pixels: torch.Tensor, dcae, tiling: str) -> io.NodeOutput:
        vae = sana_vae(dcae, "SanaDCAEEncode")
        return io.NodeOutput({"samples": vae.encode(pixels, tiled=TILING[tiling])})
