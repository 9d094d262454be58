"""Sana as a native ComfyUI MODEL: our DiT inside a FLOW `BaseModel`, wrapped in a `ModelPatcher`.

KSampler, SamplerCustomAdvanced, shift nodes, LoRA loaders and model patches then work on it, and ComfyUI's
memory manager loads, offloads and partially loads it (its layers are built from `comfy.ops`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
import comfy.samplers
import comfy.supported_models_base
import torch

from sana_core.checkpoints.dit import load_dit
from sana_core.dit import SanaDiT
from sana_core.samplers import sigma_to_timestep

log = logging.getLogger(__name__)


class SanaLatentFormat(comfy.latent_formats.LatentFormat):
    """DC-AE f32c32: 32 channels at 1/32 of the image; the DiT sees raw latents * 0.41407."""

    latent_channels = 32
    spacial_downscale_ratio = 32
    scale_factor = 0.41407


class ComfySanaDiT(SanaDiT):
    """`SanaDiT` also answering the call ComfyUI's `BaseModel` makes (text mask as `attention_mask`).

    A float16 model whose output overflows (inf/NaN) is run again in bfloat16 (float32 where the GPU has no
    bf16), with a warning, and stays there: the weights stay float16 and comfy.ops casts them layer by layer,
    so ComfyUI's memory manager and LoRA patches are untouched. Overflow in any other dtype is an error.
    """

    upcast: torch.dtype | None = None  # the compute dtype after a float16 overflow

    @property
    def dtype(self) -> torch.dtype:  # what BaseModel casts the inputs to and the blocks compute in
        return self.upcast or super().dtype

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                attention_mask: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                pag_layers: tuple[int, ...] = (), pag_batch: torch.Tensor | None = None, text_kv: list | None = None,
                transformer_options: dict | None = None, control: object = None, **kwargs: object) -> torch.Tensor:
        args = (timestep, context, attention_mask, guidance, pag_layers, pag_batch)
        out = self._run(x, args, text_kv)
        if torch.isfinite(out).all():
            return out
        if self.upcast is None and super().dtype == torch.float16:
            self.upcast = torch.bfloat16 if mm.should_use_bf16(x.device) else torch.float32
            log.warning("Sana: the DiT overflowed in float16 (inf/NaN); computing in %s from now on (the weights stay "
                        "float16, cast layer by layer)", self.upcast)
            out = self._run(x, args, text_kv)
            if torch.isfinite(out).all():
                return out
        raise FloatingPointError(f"Sana DiT ({getattr(self, 'variant', None)}) produced inf/NaN computing in "
                                 f"{self.dtype}: check the checkpoint, the LoRA strengths and the inputs")

    def _run(self, x: torch.Tensor, args: tuple, text_kv: list | None) -> torch.Tensor:
        if self.upcast is not None:
            for m in self.modules():  # re-asserted each call: ComfyUI resets the flag when it unpatches
                if hasattr(m, "comfy_cast_weights"):
                    m.comfy_cast_weights = True
            if text_kv is not None:  # keys/values a sampler computed before the switch
                text_kv = [(k.to(self.upcast), v.to(self.upcast)) for k, v in text_kv]
        return super().forward(x, *args, text_kv=text_kv)


class SanaModelSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    """Flow sampling whose DiT timestep is the engine's: int(1000 * sigma) for Sana, sigma for Sprint."""

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 1:
            return sigma
        return sigma_to_timestep(sigma, truncate=True)


class SanaKSampler(comfy.samplers.KSAMPLER):
    """A KSAMPLER that starts text-to-image (an empty latent) from pure noise, as the engine, NVlabs and
    diffusers do, instead of ComfyUI's sigma_0 * noise; image-to-image is unchanged."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        if latent_image is None or not latent_image.any():
            noise = noise / sigmas[0]
        return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                              disable_pbar)


class SanaModelConfig(comfy.supported_models_base.BASE):
    unet_extra_config = {}
    sampling_settings = {"shift": 3.0, "multiplier": 1000}
    latent_format = SanaLatentFormat
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]


class SanaModel(comfy.model_base.BaseModel):
    """FLOW BaseModel around an already loaded `ComfySanaDiT`; text masks and Sprint guidance as extra conds."""

    def __init__(self, dit: ComfySanaDiT, model_config: SanaModelConfig, device: torch.device | None = None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device)
        self.diffusion_model = dit
        self.model_sampling = SanaModelSampling(model_config)

    def extra_conds(self, **kwargs: object) -> dict:
        out = super().extra_conds(**kwargs)
        if kwargs.get("cross_attn") is not None:  # not CONDCrossAttn: that pads short prompts by repeating them
            out["c_crossattn"] = comfy.conds.CONDRegular(kwargs["cross_attn"])
        mask = kwargs.get("attention_mask")
        if mask is not None:
            out["attention_mask"] = comfy.conds.CONDRegular(mask)
        cfg = self.diffusion_model.cfg
        if cfg.guidance_embed:  # Sprint: the scale of a FluxGuidance node, else Sprint's default 4.5
            scale = kwargs.get("guidance", 4.5)
            out["guidance"] = comfy.conds.CONDRegular(torch.FloatTensor([scale * cfg.guidance_embeds_scale]))
        return out


def load_sana_model(path: str | Path, dtype: torch.dtype | None = None) -> comfy.model_patcher.ModelPatcher:
    """A Sana DiT file or folder -> MODEL. dtype None: ComfyUI's choice for this device (bf16/fp16/fp32)."""
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    if dtype is None:
        dtype = mm.unet_dtype(model_params=0, supported_dtypes=SanaModelConfig.supported_inference_dtypes)
    compute = mm.unet_manual_cast(dtype, load_device, SanaModelConfig.supported_inference_dtypes)
    ops = comfy.ops.pick_operations(dtype, compute)
    dit = load_dit(path, dtype=dtype, ops=ops, model_class=ComfySanaDiT)
    config = SanaModelConfig({"disable_unet_model_creation": True})  # the DiT is built and loaded above
    config.manual_cast_dtype = compute
    if dit.cfg.guidance_embed:
        config.sampling_settings = {"shift": 1.0, "multiplier": 1}
    elif dit.cfg.use_pe and dit.cfg.base_size >= 128:
        config.sampling_settings = {"shift": 6.0, "multiplier": 1000}
    model = SanaModel(dit, config, device=offload_device)
    model.sana_variant = dit.variant
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
