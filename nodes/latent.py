"""Latent nodes: an empty Sana latent, and the DC-AE decode/encode between LATENT and IMAGE."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from sana_core.dcae import run_finite
from sana_core.resolutions import presets

from .common import CATEGORY, DCAE, on_device

log = logging.getLogger(__name__)
PRESETS = {"custom": None, **presets()}
TILING = {"auto": None, "on": True, "off": False}  # the widget's choices -> DCAE's `tiled` argument


def _check_tiling(tiling: str) -> bool | str:
    return True if tiling in TILING else f"tiling must be one of {list(TILING)}, got {tiling!r}"


class SanaEmptyLatentImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaEmptyLatentImage", display_name="Empty Sana Latent Image", category=CATEGORY,
            description="An empty 32-channel latent at 1/32 of the image size. Width and height are multiples of 32; "
                        "a preset (Sana's aspect ratios at 512/1024/2048/4096) overrides them.",
            inputs=[io.Int.Input("width", default=1024, min=32, max=8192, step=32),
                    io.Int.Input("height", default=1024, min=32, max=8192, step=32),
                    io.Int.Input("batch_size", default=1, min=1, max=64),
                    io.Combo.Input("preset", options=list(PRESETS), default="custom", optional=True)],
            outputs=[io.Latent.Output()])

    @classmethod
    def validate_inputs(cls, width: int, height: int, batch_size: int, preset: str = "custom") -> bool | str:
        if preset not in PRESETS:
            return f"unknown preset {preset!r}"
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
            description="Decodes a Sana LATENT into an IMAGE. Tiling: auto tiles when the image would not fit in "
                        "memory (or after an out-of-memory error); on forces it, off forbids it. tile_size is the "
                        "largest tile (0: the largest that fits); tiles are made as small as their count allows. "
                        "A float16 DC-AE that overflows is switched to bfloat16 with a warning.",
            inputs=[io.Latent.Input("samples"), DCAE.Input("dcae"),
                    io.Combo.Input("tiling", options=list(TILING), default="auto"),
                    io.Int.Input("tile_size", default=0, min=0, max=8192, step=32,
                                 tooltip="largest tile in pixels; 0: the largest that fits the free memory (<= 2048)"),
                    io.Int.Input("overlap", default=256, min=0, max=4096, step=32, tooltip="pixels")],
            outputs=[io.Image.Output()])

    @classmethod
    def validate_inputs(cls, tiling: str, tile_size: int, overlap: int) -> bool | str:
        if _check_tiling(tiling) is not True:
            return _check_tiling(tiling)
        if tile_size and (tile_size < 64 or overlap >= tile_size):
            return f"tile_size ({tile_size}) must be 0 (automatic) or >= 64 and larger than overlap ({overlap})"
        return True

    @classmethod
    def execute(cls, samples: dict, dcae, tiling: str, tile_size: int, overlap: int) -> io.NodeOutput:
        import comfy.model_management as mm

        vae, z = dcae.model.inner, samples["samples"]
        if z.ndim != 4 or z.shape[1] != vae.cfg.latent_channels:
            raise ValueError(f"SanaDCAEDecode: expected a Sana latent (B, 32, H/32, W/32), got {tuple(z.shape)}; "
                             "use SanaEmptyLatentImage / SanaDCAEEncode to make Sana latents")
        dtype, tiled, per_pass = next(vae.parameters()).dtype, TILING[tiling], 4  # activations dominate memory
        # ask ComfyUI to make room for an untiled decode (it unloads idle models); what still does not fit is tiled
        need = 0 if tiled else vae.memory_needed((min(per_pass, len(z)), *z.shape[1:]), dtype)
        vae = on_device(dcae, memory_required=need)
        images = []
        for chunk in z.split(per_pass):
            x = run_finite(vae, "decode", chunk.to(mm.get_torch_device()), tiled=tiled, tile_size=tile_size or None,
                           overlap=overlap)
            images.append((x.float() / 2 + 0.5).clamp(0, 1).movedim(1, -1).to(mm.intermediate_device()))
        return io.NodeOutput(torch.cat(images))


class SanaDCAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaDCAEEncode", display_name="Sana DC-AE Encode", category=CATEGORY,
            description="Encodes an IMAGE into a Sana LATENT (for image-to-image with SanaSampler denoise < 1). "
                        "Images are center-cropped to multiples of 32.",
            inputs=[io.Image.Input("pixels"), DCAE.Input("dcae"),
                    io.Combo.Input("tiling", options=list(TILING), default="auto")],
            outputs=[io.Latent.Output()])

    @classmethod
    def validate_inputs(cls, tiling: str) -> bool | str:
        return _check_tiling(tiling)

    @classmethod
    def execute(cls, pixels: torch.Tensor, dcae, tiling: str) -> io.NodeOutput:
        import comfy.model_management as mm

        vae = dcae.model.inner
        _, H, W, _ = pixels.shape
        h, w = H // 32 * 32, W // 32 * 32
        if h == 0 or w == 0:
            raise ValueError(f"SanaDCAEEncode: the image ({W}x{H}) is smaller than 32x32 pixels")
        if (h, w) != (H, W):
            log.warning("SanaDCAEEncode: cropping %dx%d to %dx%d (multiples of 32)", W, H, w, h)
        top, left = (H - h) // 2, (W - w) // 2
        x = pixels[:, top:top + h, left:left + w, :3].movedim(-1, 1) * 2 - 1
        dtype, tiled = next(vae.parameters()).dtype, TILING[tiling]
        vae = on_device(dcae, memory_required=0 if tiled else vae.memory_needed(x.shape, dtype, decode=False))
        z = run_finite(vae, "encode", x.to(mm.get_torch_device()), tiled=tiled)
        return io.NodeOutput({"samples": z.float().to(mm.intermediate_device())})
