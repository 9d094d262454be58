"""What a Sana MODEL is patched with: the wrappers every run goes through (pure-noise start, the float16 overflow
check, area conversion, ControlNet check and the text keys/values cache of a run), perturbed-attention guidance,
and the checks they make. `model.py` holds the MODEL itself and its loader."""
from __future__ import annotations

import logging

import comfy.model_patcher
import comfy.model_sampling
import comfy.samplers
import torch

from ..sana_core import precision
from ..sana_core.denoiser import TextKVCache
from ..sana_core.dit import SanaDiT

log = logging.getLogger(__name__)
PAG_LAYERS = "sana_pag_layers"  # transformer_options key: blocks whose self-attention PAG makes the identity
TEXT_KV = "sana_text_kv"        # transformer_options key: the text keys/values cache of one sampling run


def check_flow(model_sampling: object) -> None:
    """Sana is a flow model: only flow (CONST) model sampling can drive it."""
    if not isinstance(model_sampling, comfy.model_sampling.CONST):
        raise ValueError(f"Sana is a flow-matching model, but its model sampling was replaced by "
                         f"{type(model_sampling).__name__} (a ModelSamplingDiscrete/Continuous node?); change the "
                         "shift with ModelSamplingSD3 or ModelSamplingAuraFlow instead")


def sana_pure_noise(executor, guider, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                    disable_pbar=False):
    """Wraps the sampler of every run of a Sana MODEL (`WrappersMP.SAMPLER_SAMPLE`): text-to-image (an empty
    latent) starts from pure noise, as the engine, NVlabs and diffusers do, where core's samplers start from
    sigma_0 * noise (the same with core's schedules, whose sigma_0 is 1; Sana's flow-DPM schedule starts at
    0.9997); image-to-image is unchanged."""
    if latent_image is None or not latent_image.any():
        noise = noise / sigmas[0]
    return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)


def sana_apply_model(executor, x: torch.Tensor, t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Wraps BaseModel.apply_model (`WrappersMP.APPLY_MODEL`) with the overflow check of `precision.run_finite`: a
    float16 DiT that overflows is widened and the step redone from the float32 inputs."""
    model = executor.class_obj
    check_flow(model.model_sampling)
    dit = model.diffusion_model
    return precision.run_finite(lambda: executor(x, t, *args, **kwargs), dit,
                                f"the Sana DiT ({getattr(dit, 'variant', None)})")


def check_controls(conds: dict) -> None:
    """Every ControlNet applied to the conditionings of a Sana run is a Sana one (before any tensor math):
    an SD / SDXL / Flux ControlNet would fail deep inside its own forward."""
    from .controlnet import SanaControlNetPatch

    for c in (c for entries in conds.values() for c in entries):
        control = c.get("control")
        while control is not None:
            if not isinstance(control, SanaControlNetPatch):
                raise ValueError(f"Apply ControlNet: the ControlNet ({type(control).__name__}) is not a Sana "
                                 "ControlNet (an SD1.5 / SDXL / Flux one?) and cannot drive a Sana model; load a "
                                 "Sana ControlNet with SanaControlNetLoader")
            control = control.previous_controlnet


def sana_outer_sample(executor, *args, **kwargs):
    """Wraps every sampling run of a Sana MODEL (any sampler node): area conditioning set in pixels by core
    nodes (stored in 1/8 units, as for SD latents) is converted to Sana's 1/32 latent, and the text
    keys/values cache lives for the run (not with hooks, which may change weights between steps)."""
    guider = executor.class_obj
    check_controls(getattr(guider, "conds", {}))
    hooks = False
    for conds in getattr(guider, "conds", {}).values():
        for c in conds:
            area = c.get("area")
            if area is not None and area[0] != "percentage":
                c["area"] = _area_to_32(area)
            hooks = hooks or c.get("hooks") is not None
    options = guider.model_options.setdefault("transformer_options", {})
    options[TEXT_KV] = None if hooks else TextKVCache()
    try:
        return executor(*args, **kwargs)
    finally:
        options.pop(TEXT_KV, None)


def _area_to_32(area: tuple) -> tuple:
    """(h, w, y, x) in 1/8 units (ConditioningSetArea) -> 1/32 units, covering the same pixels."""
    h, w, y, x = (v * 8 for v in area[:4])
    if any(v % 32 for v in (h, w, y, x)):
        log.warning("Sana: area conditioning %dx%d at (%d, %d) px is rounded to Sana's 32 px latent grid", w, h, x, y)
    y0, x0 = y // 32, x // 32
    return (max(1, -(-(y + h) // 32) - y0), max(1, -(-(x + w) // 32) - x0), y0, x0, *area[4:])


def add_pag(model: comfy.model_patcher.ModelPatcher, scale: float,
            layers: tuple[int, ...]) -> comfy.model_patcher.ModelPatcher:
    """A clone of a Sana MODEL with perturbed-attention guidance (as diffusers' SanaPAGPipeline):
    denoised + scale * (cond - perturbed), the perturbed pass being the positive prompt with the
    self-attention of `layers` replaced by the identity. Under CFG this is v_u + g (v_c - v_u) + p (v_c - v_pag)."""
    dit = model.get_model_object("diffusion_model")
    if not isinstance(dit, SanaDiT):
        raise ValueError("SanaPAG: the MODEL is not a Sana model; load it with a Sana loader")
    depth = dit.cfg.depth
    if not layers or not all(0 <= i < depth for i in layers):
        raise ValueError(f"pag_layers: {list(layers)} must be block numbers in 0..{depth - 1} for this model")

    def post_cfg(args: dict) -> torch.Tensor:
        options = args["model_options"].copy()
        options["transformer_options"] = {**options.get("transformer_options", {}), PAG_LAYERS: layers}
        (perturbed,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"],
                                                      options)
        return args["denoised"] + scale * (args["cond_denoised"] - perturbed)

    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(post_cfg)
    return patched
