"""Sana's DC-AE as a ComfyUI `VAE`: core VAEDecode/VAEDecodeTiled/VAEEncode/VAEEncodeForInpaint/
InpaintModelConditioning, Apply ControlNet's `vae` input and third-party nodes taking a VAE all use it, with
the engine's tile planner, out-of-memory fallback and float16 fallback behind it."""
from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.sd
import comfy.utils
import torch

from ..sana_core import precision
from ..sana_core.dcae import DCAE

from .common import model_patcher

log = logging.getLogger(__name__)


class SanaVAE(comfy.sd.VAE):
    """A `comfy.sd.VAE` over an already loaded `DCAE`. Core's constructor detects models from a state dict and
    has no way to take a built one, so it is not called; every attribute it sets is set here (the contract test
    lists them, as of core 0.38). Runs on ComfyUI's VAE device (`--cpu-vae` is honoured) under its memory
    manager; every block of every tile is a progress and cancel point. LATENTs are raw DC-AE latents (the
    0.41407 scale is applied inside sampling, as core does)."""

    WORKING_DTYPES = [torch.bfloat16, torch.float32]  # float16 overflows in the DC-AE (then widened)

    def __init__(self, dcae: DCAE, device: torch.device | None = None):
        cfg = dcae.cfg
        self.memory_used_decode = lambda shape, dtype: dcae.memory_needed(shape, dtype)
        self.memory_used_encode = lambda shape, dtype: dcae.memory_needed(shape, dtype, decode=False)
        self.downscale_ratio = self.upscale_ratio = cfg.factor
        self.latent_channels, self.latent_dim, self.output_channels = cfg.latent_channels, 2, cfg.in_channels
        self.pad_channel_value = None
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
        self.working_dtypes = self.WORKING_DTYPES
        self.disable_offload = False
        self.not_video = True
        self.size = None  # weight bytes, filled by core's model_size() where it has one
        self.downscale_index_formula = self.upscale_index_formula = self.extra_1d_channel = None
        self.crop_input = True
        self.handles_tiling = True  # decode/encode(_tiled) below run our tile planner
        self.format_encoded = None
        self.audio_sample_rate = 44100
        self.first_stage_model = dcae.eval()
        self.device = device or mm.vae_device()
        self.output_device = mm.intermediate_device()
        self.patcher = model_patcher(dcae, self.device, mm.vae_offload_device())

    # -- precision.Widenable: a float16 DC-AE that overflows is converted and the pass repeated
    @property
    def vae_dtype(self) -> torch.dtype:
        return self.first_stage_model.compute_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.vae_dtype

    def widen(self, dtype: torch.dtype) -> None:
        self.first_stage_model.widen(dtype)

    def _run(self, op: str, x: torch.Tensor, **options: object) -> torch.Tensor:
        """`op` ("encode"/"decode") of x (B, C, H, W) on the VAE device, in batches that fit, with ComfyUI's
        progress bar (blocks of every tile) and cancel checks; returns float32 on the intermediate device."""
        decode = op == "decode"
        per_sample = self.first_stage_model.memory_needed((1, *x.shape[1:]), self.vae_dtype, decode=decode)
        tiled = options.get("tiled")
        mm.load_models_gpu([self.patcher], memory_required=0 if tiled else per_sample, force_full_load=True)
        free = self.free_memory()  # as core's VAE sizes its batches: what the memory manager leaves free
        chunk = len(x) if tiled else max(1, min(len(x), int(free // max(per_sample, 1))))
        options = {**options, "max_memory": max(0, free - mm.extra_reserved_memory())}  # for the tile planner
        pbar = comfy.utils.ProgressBar(1)
        outs = []
        for start in range(0, len(x), chunk):
            part = x[start:start + chunk].to(self.device)

            def progress(done: int, total: int, first: int = start) -> None:
                mm.throw_exception_if_processing_interrupted()
                passes = -(-len(x) // chunk)
                pbar.update_absolute(first // chunk * total + done, passes * total)

            def run() -> torch.Tensor:
                net = self.first_stage_model
                return getattr(net, op)(part.to(self.vae_dtype), progress=progress, **options)

            out = precision.run_finite(run, self, f"the Sana DC-AE ({self.first_stage_model.source}) {op}r")
            outs.append(out.to(self.output_device).float())
        return torch.cat(outs)

    def free_memory(self) -> int:
        """Bytes free on the VAE device by ComfyUI's accounting (newer cores add what Dynamic VRAM can evict)."""
        probe = getattr(self.patcher, "get_free_memory", None)
        return probe(self.device) if probe is not None else mm.get_free_memory(self.device)

    def decode(self, samples_in: torch.Tensor, vae_options: dict = {}, tiled: bool | None = None,
               tile_size: int | None = None, overlap: int | None = None) -> torch.Tensor:
        """Raw latents (B, 32, h, w) -> images (B, 32h, 32w, 3) in 0..1. tiled: None decides from memory."""
        self.throw_exception_if_invalid()
        z = samples_in
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"Sana DC-AE decode: expected a Sana latent (B, {self.latent_channels}, H/32, W/32), got "
                             f"{tuple(z.shape)}; make Sana latents with SanaEmptyLatentImage or a VAE encode")
        images = self._run("decode", z, tiled=tiled, tile_size=tile_size, overlap=overlap)
        return self.process_output(images).movedim(1, -1)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """Core VAEDecodeTiled: tile and overlap in latent pixels (its pixel values / 32)."""
        f = self.upscale_ratio
        tile = max(tile_x or 16, tile_y or 16) * f
        lap = min((overlap if overlap is not None else 2) * f, tile - f)
        return self.decode(samples, tiled=True, tile_size=tile, overlap=lap)

    def encode(self, pixel_samples: torch.Tensor, tiled: bool | None = None, tile_size: int | None = None,
               overlap: int | None = None) -> torch.Tensor:
        """Images (B, H, W, C) in 0..1 -> raw latents (B, 32, H/32, W/32), centre-cropped to multiples of 32."""
        self.throw_exception_if_invalid()
        _, H, W, _ = pixel_samples.shape
        if H < self.downscale_ratio or W < self.downscale_ratio:
            raise ValueError(f"Sana DC-AE encode: the image ({W}x{H}) is smaller than 32x32 pixels")
        pixels = self.vae_encode_crop_pixels(pixel_samples)[..., :3]
        if pixels.shape[1:3] != (H, W):
            log.warning("Sana DC-AE encode: cropping %dx%d to %dx%d (multiples of 32)", W, H, pixels.shape[2],
                        pixels.shape[1])
        x = self.process_input(pixels.movedim(-1, 1))
        return self._run("encode", x, tiled=tiled, tile_size=tile_size, overlap=overlap)

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """Core VAEEncodeTiled: tile and overlap in pixels."""
        f = self.downscale_ratio
        tile = max(tile_x or 512, tile_y or 512) // f * f
        lap = min((overlap if overlap is not None else 64) // f * f, tile - f)
        return self.encode(pixel_samples, tiled=True, tile_size=max(tile, 2 * f), overlap=lap)

    def get_sd(self) -> dict:
        return self.first_stage_model.state_dict()
