"""Trainable LoRA adapters on the DiT's Linear layers, saved in diffusers' key names (no peft needed).

Our DiT fuses q/k/v (`attn.qkv`) and k/v (`cross_attn.kv_linear`): a LoRA on a fused layer with one down matrix
A (r, in) and an up matrix B (parts * out, r) is exactly one diffusers LoRA per part sharing A, with B split in
row blocks; a part that is not targeted keeps a zero, frozen block. Module names come from
`checkpoints.dit.lora_key_map`, the map `sana_core.lora.merge_lora` and the ComfyUI loader read, so a saved file
loads everywhere with the same result. Files hold `transformer.<diffusers module>.lora_A.weight` / `lora_B.weight`
with the scale alpha / rank folded into B (diffusers' `save_lora_weights` layout without adapter metadata).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.dit import lora_key_map
from ..dit import SanaDiT

#: the attention projections: self-attention q/k/v/out and cross-attention q/k/v/out (diffusers' names)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PREFIX = "transformer."


@dataclass(frozen=True)
class _Part:
    name: str     # diffusers module name, e.g. "transformer_blocks.0.attn1.to_q"
    start: int    # first row of our (fused) weight this part covers
    rows: int


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * B (A x) on the targeted row blocks of a frozen Linear layer.

    base: the layer (kept, frozen); parts: the targeted row blocks, each with its own trainable up matrix
    (rows, rank); down: (rank, in) shared. Init as diffusers' Sana script (`init_lora_weights="gaussian"`):
    A ~ N(0, 1/rank^2), B = 0, so training starts from the base model exactly.
    """

    def __init__(self, base: nn.Linear, parts: list[_Part], rank: int, alpha: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.parts = parts
        self.scale = alpha / rank
        kw = dict(dtype=torch.float32, device=base.weight.device)
        self.down = nn.Parameter(torch.randn(rank, base.in_features, generator=generator).to(**kw) / rank)
        self.ups = nn.ParameterList(nn.Parameter(torch.zeros(p.rows, rank, **kw)) for p in parts)

    def up(self) -> torch.Tensor:
        """The full up matrix (out, rank): the parts' blocks, zeros elsewhere."""
        out = self.base.out_features
        if len(self.parts) == 1 and self.parts[0].rows == out:
            return self.ups[0]
        full = self.ups[0].new_zeros(out, self.down.shape[0])
        return full.index_put((torch.cat([torch.arange(p.start, p.start + p.rows) for p in self.parts]),),
                              torch.cat(list(self.ups)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        down, up = self.down.to(x.dtype), self.up().to(x.dtype)
        return self.base(x) + (x @ down.T) @ (up.T * self.scale)

    def state(self) -> dict[str, torch.Tensor]:
        """This adapter in diffusers' names, scale folded into B: {"<name>.lora_A.weight": A, ...lora_B: B}."""
        out = {}
        for p, up in zip(self.parts, self.ups):
            out[f"{PREFIX}{p.name}.lora_A.weight"] = self.down.detach().clone()
            out[f"{PREFIX}{p.name}.lora_B.weight"] = (up.detach() * self.scale).contiguous()
        return out


def _plan(dit: SanaDiT, targets: tuple[str, ...]) -> dict[str, list[_Part]]:
    """Our Linear module name -> the diffusers parts of it that `targets` select (PEFT's rule: a target
    matches a module whose name is it or ends with "." + it)."""
    modules = dict(dit.named_modules())
    plan: dict[str, list[_Part]] = {}
    used = set()
    for name, target in lora_key_map(dit.cfg, prefix="").items():
        if not name.startswith(PREFIX):
            continue
        name = name[len(PREFIX):]
        key, (_, start, rows) = target if isinstance(target, tuple) else (target, (0, 0, None))
        module_name = key.removesuffix(".weight")
        hit = next((t for t in targets if name == t or name.endswith("." + t)), None)
        if hit is None:
            continue
        if not isinstance(modules.get(module_name), nn.Linear) or ".ff." in f".{name}":  # Mix-FFN: convs in diffusers
            raise ValueError(f"--lora_targets {hit!r} selects {name}, which is not a Linear layer (a convolution); "
                             "LoRA targets must be Linear layers such as to_q, to_k, to_v, to_out.0")
        used.add(hit)
        rows = modules[module_name].out_features if rows is None else rows
        plan.setdefault(module_name, []).append(_Part(name, start, rows))
    unknown = [t for t in targets if t not in used]
    if unknown:
        raise ValueError(f"--lora_targets {unknown} match no layer of this DiT; use diffusers' module names such as "
                         f"{', '.join(DEFAULT_TARGETS)}, attn1.to_q (self-attention only), attn2 (cross-attention) "
                         "or transformer_blocks.3.attn1.to_q")
    return plan


def add_lora(dit: SanaDiT, rank: int, alpha: float | None = None, targets: tuple[str, ...] = DEFAULT_TARGETS,
             seed: int = 0) -> list[LoRALinear]:
    """Freeze the DiT and put a LoRA of `rank` (scale alpha / rank; alpha defaults to rank) on every Linear that
    `targets` (diffusers module names or name endings) select. Returns the adapters (their parameters are the
    only trainable ones). The DiT's own parameter names do not change."""
    if rank < 1:
        raise ValueError(f"--lora_rank must be at least 1, got {rank}")
    dit.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    adapters = []
    for module_name, parts in _plan(dit, tuple(targets)).items():
        parent_name, _, attr = module_name.rpartition(".")
        parent = dit.get_submodule(parent_name)
        adapter = LoRALinear(getattr(parent, attr), sorted(parts, key=lambda p: p.start), rank,
                             float(alpha if alpha is not None else rank), generator)
        parent._modules[attr] = adapter  # in place of the Linear, same attribute name
        adapters.append(adapter)
    return adapters


def adapters_of(dit: nn.Module) -> list[LoRALinear]:
    return [m for m in dit.modules() if isinstance(m, LoRALinear)]


def lora_state_dict(dit: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter of the DiT in diffusers' key names (float32)."""
    out: dict[str, torch.Tensor] = {}
    for adapter in adapters_of(dit):
        out.update(adapter.state())
    if not out:
        raise ValueError("this DiT has no LoRA adapters to save")
    return out


def save_lora(dit: nn.Module, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `pytorch_lora_weights.safetensors` (diffusers' name, into `path` if it is a folder)."""
    from .export import write_safetensors

    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "pytorch_lora_weights.safetensors"
    sd = {k: v.to(dtype).contiguous() for k, v in lora_state_dict(dit).items()}
    return write_safetensors(sd, path, metadata={"format": "pt"})
