"""Sana LoRAs through core's LoRA loaders (LoraLoaderModelOnly, LoraLoader, hooks) as through SanaLoraLoader.

Core maps a LoRA's module names to model weights in `comfy.lora.model_lora_keys_unet`, by core model class, with
no way for another model to add its names; without ours only ComfyUI's own `diffusion_model.*` names would load
and every other Sana LoRA would silently do nothing. So that function is wrapped once: for a Sana model the map
gains the engine's `lora_key_map` (diffusers/PEFT, kohya, NVlabs and ComfyUI names, q/k/v into our fused
weights), the one SanaLoraLoader uses; other models get core's map unchanged.
"""
from __future__ import annotations

from collections.abc import Callable

import comfy.lora

from ..sana_core.checkpoints.dit import lora_key_map
from ..sana_core.dit import SanaDiT

from .common import wrap_once


def sana_key_map(model: object) -> dict:
    """LoRA names -> weights of a Sana `BaseModel` (empty for any other model)."""
    dit = getattr(model, "diffusion_model", None)
    return lora_key_map(dit.cfg) if isinstance(dit, SanaDiT) else {}


def install() -> None:
    """Wrap core's `model_lora_keys_unet` (once) so that its LoRA loaders read Sana LoRAs."""
    wrap_once(comfy.lora, "model_lora_keys_unet", _with_sana_keys)


def _with_sana_keys(core: Callable) -> Callable:
    def model_lora_keys_unet(model, key_map={}):  # noqa: B006 (core's signature)
        key_map = core(model, key_map)
        key_map.update(sana_key_map(model))
        return key_map

    return model_lora_keys_unet
