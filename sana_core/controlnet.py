"""Sana ControlNet in NVlabs' order (the released `Sana_*_ControlNet_HED.pth` files), one module.

Keys follow NVlabs (`controlnet.0.before_proj`, `controlnet.N.copied_block.*`, `controlnet.N.after_proj`), so the
branch of a combined `.pth` loads as it is. The branch reuses the base DiT's patch embedding, timestep
modulation and caption mask; its copied blocks have their own weights (their own text keys/values too):

    x = blocks[0](x_emb);  c_0 = copied_0(x + before_proj(x_embedder(hint)));  c_k = copied_k(c_{k-1})
    residual_k = after_proj_k(c_k)    is added to the output of base block k (k = 0..6), times the strength.

diffusers' `SanaControlNetModel` computes another order (its branch starts from its own embeddings, before base
block 0, and its residual k joins after base block k + 1); that layout is not read here.
Shapes: B batch, N image tokens, C width, T caption tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .dit import DiTConfig, SanaBlock

DEPTH = 7  # copied blocks in every released Sana ControlNet


class ControlBlock(nn.Module):
    """One step of the branch: (before_proj for the first,) a copy of a base block, and its output projection."""

    def __init__(self, cfg: DiTConfig, ops: Any, first: bool, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        if first:
            self.before_proj = ops.Linear(cfg.width, cfg.width, **kw)
        self.copied_block = SanaBlock(cfg, ops, dtype, device)
        self.after_proj = ops.Linear(cfg.width, cfg.width, **kw)


class SanaControlNet(nn.Module):
    """The control branch for a base DiT of config `cfg` (its width, heads, q/k norm), built through `ops`."""

    def __init__(self, cfg: DiTConfig, ops: Any = None, depth: int = DEPTH, dtype: torch.dtype | None = None,
                 device: Any = None):
        super().__init__()
        ops = ops or nn
        self.cfg = cfg
        self.controlnet = nn.ModuleList(ControlBlock(cfg, ops, i == 0, dtype, device) for i in range(depth))

    def residuals(self, x: torch.Tensor, hint: torch.Tensor, y: torch.Tensor, t6: torch.Tensor,
                  bias: torch.Tensor | None, hw: tuple[int, int]) -> list[torch.Tensor]:
        """x: (B, N, C) the output of base block 0; hint: (B, N, C) the embedded control latent; y: (B, T, C) the
        projected caption; t6, bias, hw: as the base blocks get them. Returns one (B, N, C) residual per block."""
        out, c = [], None
        for i, block in enumerate(self.controlnet):
            c = block.copied_block(x + block.before_proj(hint) if i == 0 else c,
                                   block.copied_block.cross_attn.kv(y), t6, bias, hw)
            out.append(block.after_proj(c))
        return out


@dataclass
class Control:
    """A ControlNet's input to one forward: the branch, its hint (B, 32, H, W) in the DiT's scaled latent space
    (the DC-AE-encoded control image), and a strength multiplying its residuals."""

    net: SanaControlNet
    hint: torch.Tensor
    scale: float = 1.0
