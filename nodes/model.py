"""Sana as a native ComfyUI MODEL: our DiT inside a FLOW `BaseModel`, wrapped in a `ModelPatcher` (the loader);
what patches it per run (wrappers, PAG, the text keys/values cache) is in `patches.py`.

KSampler, SamplerCustomAdvanced, SanaSampler (which runs on ComfyUI's own sampling path), shift nodes,
timestep ranges, area/mask conditioning, LoRA loaders and model patches then work on it, and ComfyUI's memory
manager loads, offloads and partially loads it (its layers are built from `comfy.ops`).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models_base
import torch

from ..sana_core.checkpoints.dit import load_dit
from ..sana_core.dit import SanaDiT, activation_bytes
from ..sana_core.spec import LATENT_SCALE, SPRINT, model_spec
from ..sana_core.previews import LATENT_RGB_BIAS, LATENT_RGB_FACTORS

from .clip import negative_side
from .common import core_patcher, eager_ops, patchable
from .patches import PAG_LAYERS, TEXT_KV, sana_apply_model, sana_outer_sample, sana_pure_noise

log = logging.getLogger(__name__)


class SanaLatentFormat(comfy.latent_formats.LatentFormat):
    """DC-AE f32c32: 32 channels at 1/32 of the image; the DiT sees raw latents * 0.41407. Live previews: the
    constant latent-to-RGB map of `sana_core.previews`, or TAESANA (nodes/previews.py; no taesd decoder is named
    here, as core's TAESD cannot load TAESANA)."""

    latent_channels = 32
    spacial_downscale_ratio = 32
    scale_factor = LATENT_SCALE  # the loader sets a DC-AE config's own on the model's instance
    latent_rgb_factors = LATENT_RGB_FACTORS
    latent_rgb_factors_bias = LATENT_RGB_BIAS


class SanaControls(list):
    """The Sana ControlNets acting on one DiT call (`sana_core.controlnet.Control`s): what a Sana CONTROL_NET's
    `get_control` hands the model instead of core's {"input": ...} residuals (the NVlabs order needs the
    output of the DiT's own block 0, so the branch runs inside the DiT's forward)."""


class ComfySanaDiT(SanaDiT):
    """`SanaDiT` answering the call ComfyUI's `BaseModel` makes.

    It computes in the dtype ComfyUI hands it the latents in (the storage dtype, or the manual-cast dtype for
    fp8 storage or a ModelComputeDtype node). After a float16 overflow (`SanaModel._apply_model`) it computes in
    `upcast`; the weights stay as stored and comfy.ops casts them layer by layer, so ComfyUI's memory manager and
    LoRA patches are untouched. PAG and the text keys/values cache come through
    `transformer_options`; Sana ControlNets come as `control` (`SanaControls`); what it cannot honour (another
    model's ControlNet, attention patches) is an error, never ignored.
    """

    upcast: torch.dtype | None = None    # the compute dtype after a float16 overflow
    _call_dtype: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.upcast or self._call_dtype or self.dtype

    def widen(self, dtype: torch.dtype) -> None:
        self.upcast = dtype

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                attention_mask: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                control: object = None, transformer_options: dict | None = None, **kwargs: object) -> torch.Tensor:
        options = transformer_options or {}
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"Sana: the latent has {x.shape[1]} channels, Sana's have {self.cfg.in_channels}: it "
                             "comes from another model's VAE or latent node; use SanaEmptyLatentImage or a VAE "
                             "Encode with the Sana DC-AE")
        if control is not None and not isinstance(control, SanaControls):
            raise ValueError("Sana: the ControlNet applied to this Sana model is not a Sana ControlNet (an SD / Flux "
                             "one?); load a Sana ControlNet with SanaControlNetLoader")
        patches = [k for k in ("patches_replace", "patches") if options.get(k)]
        if patches:
            names = sorted({name for k in patches for name in options[k]})
            raise ValueError(f"Sana: model patches {names} are for UNet/other DiT blocks and cannot apply to Sana's "
                             "blocks (use SanaPAG for perturbed attention)")
        self._call_dtype = x.dtype
        layers = tuple(options.get(PAG_LAYERS, ()))
        pag_batch = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if layers else None
        nets = [c.net for c in control or ()]
        for net in nets:
            net.compute = self.compute_dtype                   # the branch computes as the DiT does
        if self.upcast is not None:
            for m in (m for module in (self, *nets) for m in module.modules()):  # re-asserted each call: ComfyUI
                if hasattr(m, "comfy_cast_weights"):                              # resets it when it unpatches
                    m.comfy_cast_weights = True
        cache, dtype = options.get(TEXT_KV), self.compute_dtype
        kv = cache.get(self, dtype, context, attention_mask,
                       lambda: self.text_kv(context, attention_mask)) if cache else None
        controls = [replace(c, text_kv=cache.get(c.net, dtype, context, attention_mask,
                                                 lambda net=c.net: net.text_kv(context, self, attention_mask))
                            if cache else None) for c in control or ()]
        return super().forward(x.to(self.compute_dtype), timestep, context, attention_mask, guidance, layers,
                               pag_batch, text_kv=kv, controls=controls)


class SanaModelSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    """Flow sampling with Sana's shift (3.0; 6.0 for 4K; 1.0 for Sprint, which uses its own SCM times)."""


class SanaModelConfig(comfy.supported_models_base.BASE):
    unet_extra_config = {}
    sampling_settings = {}  # set per model by `load_sana_model` from `sana_core.spec.model_spec`
    latent_format = SanaLatentFormat
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]


class SanaModel(comfy.model_base.BaseModel):
    """FLOW BaseModel around an already loaded `ComfySanaDiT`; text masks and Sprint guidance as extra conds.

    The DiT's timestep is always Sana's own function of sigma (`SanaDiT.timestep`), whatever model sampling a
    shift node put in place (ModelSamplingSD3 multiplies by 1000, AuraFlow by 1: both give Sana's convention).
    """

    def __init__(self, dit: ComfySanaDiT, model_config: SanaModelConfig, device: torch.device | None = None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device)
        self.diffusion_model = dit
        self.model_sampling = SanaModelSampling(model_config)

    @property
    def manual_cast_dtype(self) -> torch.dtype | None:
        """The dtype BaseModel casts the DiT's inputs to: the widened one after a float16 overflow."""
        return getattr(self._modules.get("diffusion_model"), "upcast", None) or self._manual_cast

    @manual_cast_dtype.setter
    def manual_cast_dtype(self, dtype: torch.dtype | None) -> None:  # set by BaseModel and ModelComputeDtype
        self._manual_cast = dtype

    def process_timestep(self, timestep: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """Sana's own timestep of sigma (`SanaDiT.timestep`) from the model sampling's: flow model samplings give
        sigma * multiplier (Sana's and ModelSamplingSD3: 1000, Sprint's and AuraFlow: 1, Flux: no multiplier)."""
        sigma = timestep.float() / float(getattr(self.model_sampling, "multiplier", 1.0))
        return self.diffusion_model.timestep(sigma)

    def memory_required(self, input_shape, cond_shapes={}) -> float:
        """Activation bytes of one forward over `input_shape` (B, 32, h, w) (`sana_core.dit.activation_bytes`,
        measured within 1.0-1.3x), in the dtype it will compute in."""
        dtype = self.manual_cast_dtype or self.get_dtype()
        return activation_bytes(self.diffusion_model.cfg, input_shape[0], input_shape[-2] * input_shape[-1], dtype)

    def extra_conds(self, **kwargs: object) -> dict:
        out = super().extra_conds(**kwargs)
        context, mask = kwargs.get("cross_attn"), kwargs.get("attention_mask")
        if "negative" in str(kwargs.get("prompt_type", "")):  # a CLIP text node's prompt: its plain encoding
            context, mask = negative_side(kwargs)
        if context is not None:  # not CONDCrossAttn: that pads short prompts by repeating them
            out["c_crossattn"] = comfy.conds.CONDRegular(context)
        if mask is not None and context is not None and mask.shape[-1] < context.shape[1]:
            mask = _extend_mask(mask, context)
        if mask is not None:
            out["attention_mask"] = comfy.conds.CONDRegular(mask)
        if kwargs.get("concat_latent_image") is not None:
            log.warning("Sana: the conditioning carries an inpainting image (InpaintModelConditioning); Sana has no "
                        "inpainting model, so only the latent's noise mask is used")
        cfg = self.diffusion_model.cfg
        if cfg.guidance_embed:  # Sprint: the scale of a FluxGuidance node or SanaSampler, else Sprint's default
            scale = kwargs.get("guidance", SPRINT.guidance_scale)
            out["guidance"] = comfy.conds.CONDRegular(self.diffusion_model.guidance(scale, 1))
        elif kwargs.get("guidance") is not None:
            log.warning("Sana: the conditioning carries a guidance %s (FluxGuidance), but this Sana model has no "
                        "guidance embedder (only Sana-Sprint has one), so it is not used: set the sampler's cfg "
                        "instead", kwargs["guidance"])
        return out


def _extend_mask(mask: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The attention mask (B, n) of caption embeddings (B, N > n, D) that a node lengthened (ConditioningConcat
    appends another prompt's tokens and keeps the first mask): the appended rows count where they are not the
    all-zero rows Sana's encoder gives padding, so both prompts' tokens are attended."""
    extra = context[:, mask.shape[-1]:].abs().amax(-1) > 0                         # (B, N - n)
    return torch.cat([mask.to(extra.device).bool(), extra], dim=-1).to(mask.dtype)


#: Storage choices of the DiT loader: name -> (storage dtype or None for ComfyUI's choice, fp8 fast matmuls).
WEIGHT_DTYPES = {"default": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, False),
                 "fp32": (torch.float32, False), "fp8_e4m3fn": (torch.float8_e4m3fn, False),
                 "fp8_e4m3fn_fast": (torch.float8_e4m3fn, True), "fp8_e5m2": (torch.float8_e5m2, False)}


def weight_ops(weight_dtype: str, load_device: torch.device) -> tuple[torch.dtype, torch.dtype | None, object]:
    """(storage dtype, ComfyUI's compute dtype for it on `load_device` or None, the `comfy.ops` to build with) for
    a `WEIGHT_DTYPES` choice: the DiT's and its ControlNets' one rule."""
    dtype, fast = WEIGHT_DTYPES[weight_dtype]
    if dtype is None:
        dtype = mm.unet_dtype(model_params=0, supported_dtypes=SanaModelConfig.supported_inference_dtypes)
    compute = mm.unet_manual_cast(dtype, load_device, SanaModelConfig.supported_inference_dtypes)
    ops = comfy.ops.pick_operations(dtype, compute, load_device=load_device, fp8_optimizations=fast)
    return dtype, compute, eager_ops(ops)


def load_sana_model(path: str | Path, weight_dtype: str = "default",
                    use_pe: bool | None = None) -> comfy.model_patcher.ModelPatcher:
    """A Sana DiT file or folder -> MODEL. `weight_dtype` (a `WEIGHT_DTYPES` name) is the storage dtype; the
    compute dtype is ComfyUI's choice for it on this device (fp8 computes in bf16/fp16). use_pe: force the 2K/4K
    positional embedding on/off (None: from the config or the file name). A `.gguf` keeps its quantized matrices
    quantized (`nodes.gguf`); its other tensors are stored in that compute dtype."""
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype, compute, ops = weight_ops(weight_dtype, load_device)
    patcher_class = core_patcher()
    if str(path).lower().endswith(".gguf"):  # quantized matrices stay quantized; the rest is stored as computed
        from .gguf import GGUFComfyOps, GGUFModelPatcher

        dtype, compute, ops, patcher_class = compute or dtype, None, GGUFComfyOps, GGUFModelPatcher
    dit = patchable(load_dit(path, dtype=dtype, ops=ops, model_class=ComfySanaDiT, use_pe=use_pe))
    # the DiT is built and loaded above; model_channels (its width) lets core's FreeU nodes reach the clear refusal
    # of UNet block patches in ComfySanaDiT.forward instead of a KeyError of their own
    config = SanaModelConfig({"disable_unet_model_creation": True, "model_channels": dit.cfg.width})
    config.manual_cast_dtype = compute
    spec = model_spec(dit.cfg, path)  # the engine's defaults: the same shift for every image size
    multiplier = float(dit.timestep(torch.ones(1), truncate=False))  # the DiT's timestep per unit sigma
    config.sampling_settings = {"shift": spec.shift, "multiplier": multiplier}
    model = SanaModel(dit, config, device=offload_device)
    model.latent_format.scale_factor = spec.latent_scale  # the folder's DC-AE scaling_factor when it says one
    model.sana_variant = dit.variant
    patcher = patcher_class(model, load_device=load_device, offload_device=offload_device)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "sana", sana_outer_sample)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, "sana", sana_pure_noise)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "sana", sana_apply_model)
    return patcher
