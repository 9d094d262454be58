"""LoRA files merged into the engine's DiT (the Python API and CLI; in ComfyUI, SanaLoraLoader hands the same key
map to ComfyUI's own patcher).

A LoRA holds, per module, a down (rank, in) and an up (out, rank) matrix (diffusers/PEFT `lora_A`/`lora_B`,
kohya `lora_down`/`lora_up`, optional `alpha`): the weight changes by scale * alpha / rank * up @ down.
Module names in every format Sana LoRAs come in are mapped by `checkpoints.dit.lora_key_map`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints.dit import lora_key_map
from .checkpoints.files import CheckpointError, read_state_dict
from .dit import SanaDiT
from .quantized import LoraPatch, QuantizedTensor, add_lora_patch

SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_down.weight": "down", "lora_up.weight": "up",
            "alpha": "alpha"}


def lora_modules(sd: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"down", "up"[, "alpha"]}} of a LoRA state dict; CheckpointError if it holds none."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        for suffix, part in SUFFIXES.items():
            if key.endswith("." + suffix):
                modules.setdefault(key[: -len(suffix) - 1], {})[part] = value
                break
    modules = {k: v for k, v in modules.items() if "down" in v and "up" in v}
    if not modules:
        raise CheckpointError(f"{source}: not a LoRA (no lora_A/lora_B or lora_down/lora_up weights; found e.g. "
                              f"{list(sd)[:3]})")
    return modules


@torch.no_grad()
def merge_lora(dit: SanaDiT, path: str | Path, scale: float = 1.0) -> int:
    """Add a LoRA file's changes, times `scale`, into the DiT's weights in place; returns the modules patched.
    A quantized weight (GGUF) keeps the LoRA as a patch added at each dequantization (the same float32 sum).

    CheckpointError when a module has no counterpart in this DiT or the shapes do not fit (a LoRA for another
    model), before anything is changed."""
    source = str(path)
    modules = lora_modules(read_state_dict(path), source)
    targets = lora_key_map(dit.cfg, prefix="")
    params = dict(dit.named_parameters())
    unknown = [name for name in modules if name not in targets]
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} LoRA modules match no layer of this Sana DiT "
                              f"({dit.variant if hasattr(dit, 'variant') else 'this model'}), e.g. {unknown[:3]}: "
                              "a LoRA for another model?")
    planned = []
    for name, parts in modules.items():
        target = targets[name]
        key, (_, start, rows) = target if isinstance(target, tuple) else (target, (0, 0, None))  # rows of dim 0
        weight = params[key]
        shape = torch.Size((weight.shape[0] if rows is None else rows, *weight.shape[1:]))
        up, down = parts["up"].float().flatten(1), parts["down"].float().flatten(1)
        rank = down.shape[0]
        alpha = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        if up.shape[1] != rank or up.shape[0] * down.shape[1] != shape.numel():
            raise CheckpointError(f"{source}: LoRA module {name} ({tuple(parts['up'].shape)} x "
                                  f"{tuple(parts['down'].shape)}) does not fit {key} {tuple(shape)}: a LoRA "
                                  "for another model?")
        planned.append((weight, LoraPatch(up, down, scale * alpha, start, rows)))
    for weight, patch in planned:
        if isinstance(weight, QuantizedTensor):
            add_lora_patch(weight, patch)
        else:
            patch(weight)
    return len(planned)
