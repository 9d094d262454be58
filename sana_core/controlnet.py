"""Sana ControlNet: a branch of copied DiT blocks whose outputs are added to the base DiT's, one module.

Two orders exist and each file is run in the order it was trained in (`SanaControlNet.order`):

- **NVlabs** (the released `Sana_*_ControlNet_HED.pth` files; keys `controlnet.0.before_proj`,
  `controlnet.N.copied_block.*`, `controlnet.N.after_proj`). The branch reuses the base DiT's patch embedding,
  timestep modulation and caption projection; it starts from the output of base block 0:

      c_0 = copied_0(x_0 + before_proj(x_embedder(hint)));  c_k = copied_k(c_{k-1});  x_0 = blocks[0](x_emb)
      residual_k = after_proj_k(c_k) joins the output of base block k (k = 0..6).

- **diffusers** (`SanaControlNetModel` folders: `input_block`, `transformer_blocks.N`, `controlnet_blocks.N`
  and its own embedders, stored here under NVlabs' names as the DiT's are). The branch starts from its own
  embedding of the latent, before any base block, and its residual k joins the output of base block k + 1:

      c_0 = copied_0(x_emb' + before_proj(x_emb'(hint)));  residual_k = after_proj_k(c_k) -> base block k + 1.

Both share the layers (`before_proj` = diffusers' `input_block`, `after_proj` = `controlnet_blocks`), so one
class holds either. Shapes: B batch, N image tokens, C width, T caption tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .dit import BaseState, DiTConfig, DiTInputs, SanaBlock, SanaDiT, TextGroups, caption_kv

DEPTH = 7  # copied blocks in every released Sana ControlNet
Order = Literal["nvlabs", "diffusers"]


class ControlBlock(nn.Module):
    """One step of the branch: (before_proj for the first,) a copy of a base block, and its output projection."""

    def __init__(self, cfg: DiTConfig, ops: Any, first: bool, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        if first:
            self.before_proj = ops.Linear(cfg.width, cfg.width, **kw)
        self.copied_block = SanaBlock(cfg, ops, dtype, device)
        self.after_proj = ops.Linear(cfg.width, cfg.width, **kw)


class SanaControlNet(DiTInputs):
    """The control branch for a base DiT of config `cfg` (its width, heads, q/k norm), built through `ops`.
    `order` "diffusers" also builds the branch's own embedders (`DiTInputs`, without Sprint's guidance one)."""

    def __init__(self, cfg: DiTConfig, order: Order = "nvlabs", ops: Any = None, depth: int = DEPTH,
                 dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        if order not in ("nvlabs", "diffusers"):
            raise ValueError(f"ControlNet order must be 'nvlabs' or 'diffusers', got {order!r}")
        ops = ops or nn
        self.cfg, self.order = cfg, order
        if order == "diffusers":
            self._build_inputs(cfg, ops, dtype=dtype, device=device)
        self.controlnet = nn.ModuleList(ControlBlock(cfg, ops, i == 0, dtype, device) for i in range(depth))

    @property
    def first_block(self) -> int:
        """The base block whose output residual 0 joins (then k joins block first_block + k)."""
        return 0 if self.order == "nvlabs" else 1

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.controlnet[0].after_proj.weight.dtype

    def widen(self, dtype: torch.dtype) -> None:
        """Compute in `dtype` from now on (see `precision.run_finite`)."""
        self.to(dtype)

    def check_base(self, cfg: DiTConfig) -> None:
        """ValueError unless this branch can drive a DiT of config `cfg`: the same width, MLP and q/k norm, and
        a block for each residual to join."""
        if self.cfg.width != cfg.width:
            raise ValueError(f"a ControlNet of width {self.cfg.width} cannot drive this DiT of width {cfg.width}: "
                             "use the ControlNet released for that model")
        ours, theirs = (self.cfg.mlp_ratio, self.cfg.qk_norm), (cfg.mlp_ratio, cfg.qk_norm)
        if ours != theirs:
            raise ValueError(f"a ControlNet made for a DiT with (MLP ratio, q/k norm) {ours} cannot drive this DiT "
                             f"with {theirs}: use the ControlNet released for that model")
        last = self.first_block + len(self.controlnet) - 1
        if last >= cfg.depth:
            raise ValueError(f"this ControlNet ({self.order} order) adds to base blocks up to {last}, but the DiT "
                             f"has {cfg.depth} blocks")

    def embed_caption(self, context: torch.Tensor, dit: SanaDiT) -> torch.Tensor:
        """(B, T, 2304) -> (B, T, C): the base DiT's caption projection (NVlabs) or the branch's own (diffusers)."""
        owner = dit if self.order == "nvlabs" else self
        return owner.embed_text(context.to(owner.compute_dtype))

    def text_kv(self, context: torch.Tensor, dit: SanaDiT, mask: torch.Tensor | None = None) -> list[TextGroups]:
        """Every copied block's cross-attention keys and values for context (B, T, 2304) and its `mask` (as
        `SanaDiT.text_kv`), to compute once per sampling run and pass as `Control.text_kv`."""
        return caption_kv([block.copied_block.cross_attn for block in self.controlnet],
                          lambda c: self.embed_caption(c, dit), context, mask)

    def residuals(self, hint: torch.Tensor, base: BaseState,
                  text_kv: list[TextGroups] | None = None) -> list[torch.Tensor]:
        """hint: (B, 32, H, W) control latent (scaled, as the DiT's latent). Returns one (B, N, C) residual per
        copied block, unscaled; residual k joins the output of base block `first_block + k`."""
        if text_kv is None:
            if base.context is None:
                raise ValueError("a ControlNet needs the caption (context) or its text keys/values (text_kv)")
            text_kv = self.text_kv(base.context, base.dit, base.context_mask)
        if self.order == "nvlabs":
            x, t6 = base.block0, base.t6
            c = base.dit.x_embedder.proj(hint.to(x.dtype)).flatten(2).mT         # the base's own patch embedding
        else:
            x = self.embed_latent(base.latent)
            c = self.embed_latent(hint)
            t6 = self.modulation(base.timestep, x.shape[0], x.device)[1]
        out = []
        for i, (block, kv) in enumerate(zip(self.controlnet, text_kv)):
            c = block.copied_block(x + block.before_proj(c) if i == 0 else c, kv, t6, base.hw)
            out.append(block.after_proj(c))
        return out


@dataclass
class Control:
    """A ControlNet's input to the sampler and the DiT: the branch, its hint (1 or B, 32, H, W) in the DiT's
    scaled latent space (the DC-AE-encoded control image), a strength multiplying its residuals, and the
    fraction of the sampling steps it acts on, [start, end] (diffusers' `control_guidance_start/end`).
    `text_kv`: the branch's text keys/values for the current batch, set by the sampler once per run."""

    net: SanaControlNet
    hint: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    text_kv: list[TextGroups] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"ControlNet start/end must satisfy 0 <= start <= end <= 1, got {self.start}, {self.end}")

    def block_residuals(self, base: BaseState) -> dict[int, torch.Tensor]:
        """{base block index: the strength-scaled residual (B, N, C) to add to its output} for one DiT forward
        (the DiT's `BlockResiduals` interface)."""
        dit, B = base.dit, base.latent.shape[0]
        self.net.check_base(dit.cfg)
        hint = self.hint
        if hint.shape[0] not in (1, B) or hint.shape[-2:] != base.latent.shape[-2:]:
            raise ValueError(f"a ControlNet hint of shape {tuple(hint.shape)} does not match the latent "
                             f"{tuple(base.latent.shape)} (batch 1 or {B}, same latent size)")
        hint = hint.to(base.latent.device).expand(B, -1, -1, -1)
        return {self.net.first_block + k: self.scale * r.to(base.block0.dtype)
                for k, r in enumerate(self.net.residuals(hint, base, self.text_kv))}
