"""The Sana linear DiT (NVlabs `SanaMS`; diffusers `SanaTransformer2DModel`), one module.

Parameter names follow the original NVlabs checkpoints (`blocks.N.attn.qkv`, `blocks.N.cross_attn.kv_linear`,
...), so `.pth` files load as they are and diffusers files go through `checkpoints/dit.py`.

Shapes: B batch, C width, N = H*W image tokens (patch size 1: one token per latent pixel), T text tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .samplers import sigma_to_timestep


@dataclass(frozen=True)
class DiTConfig:
    depth: int = 20                  # number of transformer blocks
    width: int = 2240                # C, hidden size
    cross_heads: int = 20            # cross-attention heads (head dim = width // cross_heads)
    self_head_dim: int = 32          # self-attention head dim (heads = width // 32)
    in_channels: int = 32            # DC-AE latent channels (out channels are the same)
    patch_size: int = 1
    caption_channels: int = 2304     # Gemma-2-2B hidden size
    mlp_ratio: float = 2.5           # GLUMBConv hidden = int(mlp_ratio * width)
    qk_norm: bool = False            # RMSNorm on q and k across heads (Sana 1.5, Sprint)
    guidance_embed: bool = False     # Sprint: guidance scale enters through `cfg_embedder`
    use_pe: bool = False             # fixed 2D sin-cos positional embedding (2K/4K models)
    pe_interpolation: float = 1.0    # sin-cos grid divisor (NVlabs `pe_interpolation`)
    base_size: int = 32              # latent side the sin-cos grid is normalised to (image size // 32)
    timestep_scale: float = 1.0      # the sampler feeds 1000 * sigma * this (diffusers `timestep_scale`)
    guidance_embeds_scale: float = 0.1  # Sprint: the sampler feeds guidance scale * this to `cfg_embedder`

    @property
    def self_heads(self) -> int:
        return self.width // self.self_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.width)


def activation_bytes(cfg: DiTConfig, batch: int, tokens: int, dtype: torch.dtype, text_tokens: int = 300) -> int:
    """Peak bytes of the activations of one forward over `batch` samples of `tokens` latent pixels with
    `text_tokens` caption tokens, computing in `dtype` (weights not included).

    Per image token about 13 * width elements are alive at once (inside the Mix-FFN: its 5 * width-wide
    hidden state twice, the gated half, the residual stream); per caption token every block's keys and values
    (2 * width) and 2 * width more. Measured with
    `bench/peak.py` (every live tensor, CUDA's `max_memory_allocated` count) for the 0.6B and 1.6B widths at
    512-4096 px and batch 1-4, this estimate is 1.04-1.05x the measurement (`bench/dit_memory.py`; up to 1.22x
    at 256 px, where the 300 caption tokens outweigh the 64 image tokens).
    """
    e = max(torch.finfo(dtype).bits // 8, 2)  # fp8 storage computes in (at least) 16 bits
    per_token = 13 * cfg.width * e
    per_text = (2 * cfg.depth + 2) * cfg.width * e
    return int(1.05 * batch * (tokens * per_token + text_tokens * per_text))


_06B = DiTConfig(depth=28, width=1152, cross_heads=16)
_16B = DiTConfig(depth=20, width=2240, cross_heads=20)

#: Every released Sana DiT. Names are ours; `checkpoints/dit.py` detects them from the weights.
VARIANTS: dict[str, DiTConfig] = {
    "sana-0.6b": _06B,
    "sana-1.6b": _16B,
    "sana-1.6b-2k": replace(_16B, use_pe=True, pe_interpolation=1.0, base_size=64),
    "sana-1.6b-4k": replace(_16B, use_pe=True, pe_interpolation=2.0, base_size=128),
    "sana-1.5-1.6b": replace(_16B, qk_norm=True),
    "sana-1.5-4.8b": replace(_16B, depth=60, qk_norm=True),
    "sana-sprint-0.6b": replace(_06B, qk_norm=True, guidance_embed=True),
    "sana-sprint-1.6b": replace(_16B, qk_norm=True, guidance_embed=True),
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, statistics in fp32 (as diffusers/NVlabs), result in x's dtype."""
    y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    y = y.to(x.dtype)
    return y if weight is None else y * weight.to(y)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps. t: (B,) -> (B, dim) fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim: int, h: int, w: int, base_size: int, interpolation: float) -> torch.Tensor:
    """Fixed 2D sin-cos positional embedding of an h x w token grid -> (h*w, dim) fp32, on the CPU.

    Positions are normalised to a `base_size` grid and divided by `interpolation` (NVlabs `pe_interpolation`);
    the first half of the channels encodes the column, the second the row (diffusers' convention). Computed in
    float64 on the CPU as NVlabs and diffusers do (some accelerators have no float64).
    """
    def axis(n: int, positions: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, dim/2), [sin | cos]
        omega = torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0)
        out = positions.double()[:, None] * (1.0 / 10000**omega)[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows = torch.arange(h, dtype=torch.float32) / (h / base_size) / interpolation
    cols = torch.arange(w, dtype=torch.float32) / (w / base_size) / interpolation
    ew, eh = axis(w, cols), axis(h, rows)  # (w, dim/2), (h, dim/2)
    emb = torch.cat([ew[None].expand(h, w, -1), eh[:, None].expand(h, w, -1)], dim=-1)
    return emb.reshape(h * w, dim).float()


def relu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """ReLU linear attention, O(N): out_n = sum_m (q_n . k_m) v_m / sum_m (q_n . k_m), q and k after ReLU.

    q, k, v: (B, heads, N, d), any dtype and strides; accumulated in fp32 (also under autocast, as NVlabs'
    trainer runs it); returns (B, heads, N, d) fp32.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k = _fp32(q, relu=True), _fp32(k, relu=True)
        kv = k.mT @ _fp32(v)                               # (B, heads, d, d)
        den = q @ k.sum(dim=2, keepdim=True).mT            # (B, heads, N, 1)
        return (q @ kv).div_(den.add_(eps))                # (B, heads, N, d)


def _fp32(t: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """A contiguous fp32 copy of t, made in one pass (cast and layout change together), ReLU'd if asked."""
    out = torch.empty(t.shape, dtype=torch.float32, device=t.device).copy_(t)
    return out.relu_() if relu else out


class _CaptionProjection(nn.Module):
    """Linear(2304 -> C) -> GELU(tanh) -> Linear(C -> C) (keys `fc1`, `fc2`)."""

    def __init__(self, dim_in: int, width: int, ops: Any, **kw: Any):
        super().__init__()
        self.fc1 = ops.Linear(dim_in, width, **kw)
        self.fc2 = ops.Linear(width, width, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _TimestepEmbedder(nn.Module):
    """Sinusoidal(256) -> Linear -> SiLU -> Linear (keys `mlp.0`, `mlp.2`)."""

    def __init__(self, width: int, ops: Any, **kw: Any):
        super().__init__()
        self.mlp = nn.Sequential(ops.Linear(256, width, **kw), nn.SiLU(), ops.Linear(width, width, **kw))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # (B,) -> (B, C)
        return self.mlp(timestep_embedding(t).to(dtype))


class _Conv(nn.Module):
    """A layer under a `.conv` attribute, as NVlabs' `ConvLayer` stores it."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv


class GLUMBConv(nn.Module):
    """Mix-FFN: 1x1 conv C->2F, SiLU, depthwise 3x3, x * SiLU(gate), 1x1 conv F->C (no bias).

    The 1x1 convs run as Linear layers on the tokens (the same maps, a plain matmul, faster than a conv);
    their weights are stored 2-D (`checkpoints/dit.py` reshapes the checkpoints' (out, in, 1, 1) kernels).
    """

    def __init__(self, width: int, hidden: int, ops: Any, **kw: Any):
        super().__init__()
        self.inverted_conv = _Conv(ops.Linear(width, 2 * hidden, **kw))
        self.depth_conv = _Conv(ops.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, **kw))
        self.point_conv = _Conv(ops.Linear(hidden, width, bias=False, **kw))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        x = F.silu(self.inverted_conv.conv(x))                            # (B, N, 2F)
        x = self.depth_conv.conv(x.unflatten(1, hw).permute(0, 3, 1, 2))  # (B, 2F, H, W), channels-last memory
        x, gate = x.flatten(2).transpose(1, 2).chunk(2, dim=-1)           # 2 x (B, N, F)
        return self.point_conv.conv(x * F.silu(gate))


class LinearSelfAttention(nn.Module):
    """Self-attention with ReLU linear attention; optional q/k RMSNorm; PAG identity path."""

    def __init__(self, cfg: DiTConfig, ops: Any, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        C, kw = cfg.width, dict(dtype=dtype, device=device)
        self.heads = cfg.self_heads
        self.qkv = ops.Linear(C, 3 * C, bias=False, **kw)
        self.proj = ops.Linear(C, C, **kw)
        if cfg.qk_norm:
            self.q_norm = _Norm(C, **kw)
            self.k_norm = _Norm(C, **kw)

    def forward(self, x: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C). `identity`: (B,) bool, samples whose attention is replaced by v (PAG)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)                   # (B, N, C) each
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        out = relu_linear_attention(*(t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v)))
        out = torch.empty(B, N, self.heads, C // self.heads, dtype=x.dtype, device=x.device).copy_(out.transpose(1, 2))
        out = out.view(B, N, C)                                  # one pass: back to token-major and x's dtype
        if identity is not None:
            out = torch.where(identity[:, None, None], v, out)
        return self.proj(out)


@dataclass
class TextGroups:
    """One cross-attention's text keys/values, each caption on its real tokens only: the samples `rows[g]` (a
    slice or index list into the batch) share a caption length T_g and their keys/values `keys[g]`,
    `values[g]` (G, heads, T_g, d). Attending only real tokens is the masked softmax of NVlabs and diffusers
    (padding biased by -10000 underflows to exactly 0 weight) without computing on the padding, and masks with
    holes (ConditioningConcat's: two prompts, each followed by its padding) need nothing of their own."""

    rows: list[slice | list[int]]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def caption_kv(attns: Sequence["CrossAttention"], embed: Any, context: torch.Tensor,
               mask: torch.Tensor | None = None) -> list[TextGroups]:
    """The text keys/values (`TextGroups`) of the cross-attentions `attns` for captions (B, T, 2304) with `mask`
    (B, T), 1 for real tokens (None: all real); `embed` maps captions (1, L, 2304) -> (1, L, C).

    Every distinct caption's real tokens are projected once (a caption repeated in the batch, as CFG's negative
    or PAG's copy, is one; one projection call per layer over all of them), then the batch's rows are grouped by
    caption length. A caption without any real token attends to all of its T rows, as a masked softmax whose
    bias shifts every row alike."""
    captions = [_real_tokens(c, None if mask is None else mask[i].bool()) for i, c in enumerate(context)]
    distinct: list[torch.Tensor] = []  # the batch's distinct captions (T_i, 2304)
    first = []                         # per sample: its caption's index in `distinct`
    for c in captions:
        j = next((j for j, d in enumerate(distinct) if d.shape == c.shape and torch.equal(d, c)), None)
        if j is None:
            j, _ = len(distinct), distinct.append(c)
        first.append(j)
    lengths = [c.shape[0] for c in distinct]
    y = _cat([embed(c[None]) for c in distinct], dim=1)         # (1, sum T_i, C): one projection call per block
    rows: dict[int, list[int]] = {}
    for i, j in enumerate(first):
        rows.setdefault(lengths[j], []).append(i)
    groups = []
    for a in attns:
        kv = list(zip(*(t.split(lengths, dim=2) for t in a.kv(y))))  # per distinct caption 2 x (1, heads, T_i, d)
        groups.append(TextGroups([_rows(r) for r in rows.values()],
                                 [_cat([kv[first[i]][0] for i in r]) for r in rows.values()],
                                 [_cat([kv[first[i]][1] for i in r]) for r in rows.values()]))
    return groups


def _real_tokens(caption: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """A caption's real rows: (T, D) -> (T_i, D), a view when they come first (right padding), else a copy; all T
    rows when none is real."""
    n = caption.shape[0] if keep is None else int(keep.sum())
    if n == 0 or n == caption.shape[0] or bool(keep[:n].all()):
        return caption[:n or None]
    return caption[keep]


def _cat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _rows(rows: list[int]) -> slice | list[int]:
    """Batch rows as a slice when consecutive (a view of q, no copy), else the index list."""
    return slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else rows


class CrossAttention(nn.Module):
    """Softmax attention from image tokens to each sample's caption tokens (`TextGroups`)."""

    def __init__(self, cfg: DiTConfig, ops: Any, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        C, kw = cfg.width, dict(dtype=dtype, device=device)
        self.heads = cfg.cross_heads
        self.q_linear = ops.Linear(C, C, **kw)
        self.kv_linear = ops.Linear(C, 2 * C, **kw)
        self.proj = ops.Linear(C, C, **kw)
        if cfg.qk_norm:
            self.q_norm = _Norm(C, **kw)
            self.k_norm = _Norm(C, **kw)

    def kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the projected text y: (B, T, C) -> 2 x (B, heads, T, d)."""
        B, T, C = y.shape
        k, v = self.kv_linear(y).chunk(2, dim=-1)
        if hasattr(self, "k_norm"):
            k = self.k_norm(k)
        return tuple(t.reshape(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (k, v))

    def forward(self, x: torch.Tensor, kv: TextGroups) -> torch.Tensor:
        """x: (B, N, C) image tokens; kv: the text keys/values of the batch's captions (`caption_kv`)."""
        B, N, C = x.shape
        q = self.q_linear(x)
        if hasattr(self, "q_norm"):
            q = self.q_norm(q)
        q = q.reshape(B, N, self.heads, C // self.heads).transpose(1, 2)
        if len(kv.rows) == 1 and kv.rows[0] == slice(0, B):  # one caption length: the whole batch at once
            out = F.scaled_dot_product_attention(q, kv.keys[0], kv.values[0])  # (B, heads, N, d)
        else:
            out = torch.empty_like(q)
            for rows, k, v in zip(kv.rows, kv.keys, kv.values):
                out[rows] = F.scaled_dot_product_attention(q[rows], k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class _Norm(nn.Module):
    """RMSNorm with a learned weight (eps 1e-5, as diffusers' caption_norm and q/k norms)."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale1: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine, eps 1e-6) then AdaLN: x * scale1 + shift, scale1 = 1 + scale (one fused multiply-add)."""
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=1e-6), scale1)


class SanaBlock(nn.Module):
    """AdaLN-single block: linear self-attention, cross-attention to text, Mix-FFN, each with a residual."""

    def __init__(self, cfg: DiTConfig, ops: Any, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.empty(6, cfg.width, dtype=dtype, device=device))
        self.attn = LinearSelfAttention(cfg, ops, dtype, device)
        self.cross_attn = CrossAttention(cfg, ops, dtype, device)
        self.mlp = GLUMBConv(cfg.width, cfg.mlp_hidden, ops, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, kv: TextGroups, t6: torch.Tensor, hw: tuple[int, int],
                identity: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C); kv: this block's text keys/values; t6: (B, 6, C) modulation from `t_block`, with 1 already
        added to the two scales (rows 1 and 4), once for all blocks."""
        mod = self.scale_shift_table.to(t6)[None] + t6               # (B, 6, C)
        shift_sa, scale1_sa, gate_sa, shift_ff, scale1_ff, gate_ff = mod.to(x.dtype).chunk(6, dim=1)
        x = torch.addcmul(x, gate_sa, self.attn(_modulate(x, shift_sa, scale1_sa), identity))  # x + gate * attn
        x = x + self.cross_attn(x, kv)
        return torch.addcmul(x, gate_ff, self.mlp(_modulate(x, shift_ff, scale1_ff), hw))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig, ops: Any, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        out = cfg.patch_size**2 * cfg.in_channels
        self.scale_shift_table = nn.Parameter(torch.empty(2, cfg.width, dtype=dtype, device=device))
        self.linear = ops.Linear(cfg.width, out, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # (B, N, C), (B, C) -> (B, N, p*p*32)
        shift, scale = (self.scale_shift_table.to(t)[None] + t[:, None]).to(x.dtype).chunk(2, dim=1)
        return self.linear(_modulate(x, shift, 1 + scale))


class DiTInputs(nn.Module):
    """The input side of a Sana DiT under NVlabs' names: patch embedding (+ the 2K/4K sin-cos grid), timestep
    (and Sprint guidance) embedding with the AdaLN-single projection, caption projection + RMSNorm. Shared by
    `SanaDiT` and the diffusers-order ControlNet, which has its own copy of these layers."""

    cfg: DiTConfig

    def _build_inputs(self, cfg: DiTConfig, ops: Any, **kw: Any) -> None:
        C, p = cfg.width, cfg.patch_size
        self.x_embedder = nn.Module()
        self.x_embedder.proj = ops.Conv2d(cfg.in_channels, C, p, stride=p, **kw)
        self.t_embedder = _TimestepEmbedder(C, ops, **kw)
        if cfg.guidance_embed:
            self.cfg_embedder = _TimestepEmbedder(C, ops, **kw)
        self.t_block = nn.Sequential(nn.SiLU(), ops.Linear(C, 6 * C, **kw))
        self.y_embedder = nn.Module()
        self.y_embedder.y_proj = _CaptionProjection(cfg.caption_channels, C, ops, **kw)
        self.attention_y_norm = _Norm(C, **kw)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations are computed in: the weights' (ComfyUI's DiT may compute wider than it stores)."""
        return self.t_block[1].weight.dtype

    def pos_embed(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """The 2K/4K models' sin-cos embedding of an h x w token grid (h*w, C) fp32 on `device`, kept for the
        last grid and device (not a buffer: the model stays loadable on `meta`)."""
        key = (h, w, device)
        if getattr(self, "_pe", (None,))[0] != key:
            self._pe = key, sincos_pos_embed(self.cfg.width, h, w, self.cfg.base_size, self.cfg.pe_interpolation
                                             ).to(device)
        return self._pe[1]

    def embed_latent(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 32, H, W) latent -> (B, N, C) tokens, token-major, in the compute dtype (+ the sin-cos grid)."""
        p = self.cfg.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        dtype = self.compute_dtype
        tokens = self.x_embedder.proj(x.to(dtype)).flatten(2).mT.contiguous()
        if self.cfg.use_pe:
            tokens = (tokens.float() + self.pos_embed(x.shape[-2] // p, x.shape[-1] // p, x.device)[None]).to(dtype)
        return tokens

    def modulation(self, timestep: torch.Tensor, batch: int, device: torch.device,
                   guidance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep (B,) or scalar -> t (B, C) for the final layer and t6 (B, 6, C) for the blocks, with 1
        already added to the two scales (rows 1 and 4), once for all blocks."""
        dtype = self.compute_dtype
        t = self.t_embedder(torch.as_tensor(timestep, device=device).reshape(-1).expand(batch), dtype)  # (B, C)
        if self.cfg.guidance_embed:
            if guidance is None:
                raise ValueError("this Sana-Sprint model needs `guidance` (the guidance scale) in forward()")
            t = t + self.cfg_embedder(torch.as_tensor(guidance, device=device).reshape(-1).expand(batch), dtype)
        t6 = self.t_block(t).unflatten(1, (6, -1))                              # (B, 6, C)
        t6[:, 1::3] += 1
        return t, t6

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Caption projection + RMSNorm: (B, T, 2304) -> (B, T, C)."""
        return self.attention_y_norm(self.y_embedder.y_proj(context))


@dataclass
class BaseState:
    """What a ControlNet (a `BlockResiduals`) reads of one base DiT forward: the DiT, its latent (B, 32, H, W) and timestep (B,) or
    scalar (as `SanaDiT.forward` got it), the output of base block 0 (B, N, C), the modulation t6 (B, 6, C), the
    token grid (h, w), the Gemma states (B, T, 2304) (None when only cached keys/values are at hand) and their
    mask (B, T) or None."""

    dit: SanaDiT
    latent: torch.Tensor
    timestep: torch.Tensor
    block0: torch.Tensor
    t6: torch.Tensor
    hw: tuple[int, int]
    context: torch.Tensor | None
    context_mask: torch.Tensor | None = None


class BlockResiduals(Protocol):
    """What adds to the outputs of the DiT's blocks (a ControlNet's `controlnet.Control`): called once per
    forward with the state after block 0, returns {block index: residual (B, N, C)} for the blocks it joins."""

    def block_residuals(self, base: BaseState) -> dict[int, torch.Tensor]: ...


class SanaDiT(DiTInputs):
    """The linear DiT: predicts the flow velocity v = noise - x0 of a DC-AE latent.

    Layers are built through `ops` (default `torch.nn`; ComfyUI passes `comfy.ops.*` for casting/offload).
    The model holds no buffers, so it can be built on `meta` and loaded with `assign=True`.
    """

    def __init__(self, cfg: DiTConfig, ops: Any = None, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        ops = ops or nn
        self.cfg = cfg
        self._build_inputs(cfg, ops, dtype=dtype, device=device)
        self.blocks = nn.ModuleList(SanaBlock(cfg, ops, dtype, device) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg, ops, dtype, device)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in."""
        return self.final_layer.scale_shift_table.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations are computed in: the weights' (ComfyUI's DiT may compute wider than it stores)."""
        return self.dtype

    def widen(self, dtype: torch.dtype) -> None:
        """Compute in `dtype` from now on: the weights are converted (see `precision.run_finite`)."""
        self.to(dtype)

    def timestep(self, sigma: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        """The timestep this model is given for flow sigma (B,) (the one place of this convention): the sigma
        itself for Sprint; else 1000 * sigma, truncated to an integer as NVlabs' model and diffusers' DPM-Solver
        do (`truncate=False`: diffusers' FlowMatchEuler), times `timestep_scale`."""
        if self.cfg.guidance_embed:
            return sigma
        return sigma_to_timestep(sigma, truncate=truncate) * self.cfg.timestep_scale

    def guidance(self, scale: float, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Sprint's guidance embedder input for the guidance scale `scale` (the one place of this rule): (batch,)
        float32 `scale * guidance_embeds_scale` (NVlabs `cfg_embed_scale`), multiplied in float32 as diffusers'
        SanaSprintPipeline does."""
        return torch.full((batch,), float(scale), dtype=torch.float32, device=device) * self.cfg.guidance_embeds_scale

    def text_kv(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> list[TextGroups]:
        """Every block's cross-attention keys and values for context (B, T, 2304) and its `mask` (B, T), 1 for
        real tokens (`caption_kv`). They do not change over the sampling steps, so a sampler computes them once
        (`TextKVCache`) and passes them to `forward` as `text_kv`."""
        embed = lambda c: self.embed_text(c.to(self.compute_dtype))  # noqa: E731
        return caption_kv([block.cross_attn for block in self.blocks], embed, context, mask)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        pag_layers: Iterable[int] = (),
        pag_batch: torch.Tensor | None = None,
        text_kv: list[TextGroups] | None = None,
        controls: Sequence[BlockResiduals] = (),
    ) -> torch.Tensor:
        """Velocity prediction.

        x: (B, 32, H, W) latent (H, W in latent pixels); timestep: (B,) or scalar, as the model was trained
        (1000 * sigma * `timestep_scale` for Sana; the flow sigma for Sprint: see `samplers`);
        context: (B, T, 2304) Gemma states; context_mask: (B, T), 1 for real tokens, 0 for padding
        (each sample its own); guidance: (B,) Sprint guidance embedding input (scale * `guidance_embeds_scale`);
        pag_layers / pag_batch: blocks and (B,) bool samples whose self-attention is the identity (PAG);
        text_kv: `text_kv(context, context_mask)` computed earlier (context is then unused but by ControlNets);
        controls: `BlockResiduals` (ControlNets' `controlnet.Control`), each adding its strength-scaled residuals to
        the outputs of base blocks in its own order (`SanaControlNet.order`), summed; their step ranges are the
        sampler's business.
        Returns v: (B, 32, H, W) in x's dtype.
        """
        cfg = self.cfg
        B, _, H, W = x.shape
        p = cfg.patch_size
        h, w = H // p, W // p
        tokens = self.embed_latent(x)                                            # (B, N, C)
        t, t6 = self.modulation(timestep, B, x.device, guidance)                # (B, C), (B, 6, C)
        kv = text_kv if text_kv is not None else self.text_kv(context, context_mask)  # per block `TextGroups`
        pag, residuals = set(pag_layers), {}
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, kv[i], t6, (h, w), pag_batch if i in pag else None)
            if i == 0 and controls:
                base = BaseState(self, x, timestep, tokens, t6, (h, w), context, context_mask)
                for control in controls:
                    for k, r in control.block_residuals(base).items():
                        residuals[k] = residuals[k] + r if k in residuals else r
            if i in residuals:
                tokens = tokens + residuals.pop(i)
        out = self.final_layer(tokens, t)                                        # (B, N, p*p*32)
        out = out.reshape(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(B, -1, H, W)
        return out.to(x.dtype)
