"""DC-AE, Sana's deep-compression autoencoder (f32c32: RGB -> 32 latent channels at 1/32 of the size).

Parameter names follow diffusers' `AutoencoderDC`, so diffusers files load as they are; mit-han-lab's
efficientvit files go through `checkpoints/dcae.py`. Images are (B, 3, H, W) in [-1, 1], H and W multiples of
32; raw latents are (B, 32, H/32, W/32); the DiT works on `scale(raw) = raw * 0.41407`.

Encoder: conv_in -> 6 stages (stage i at 1/2^i of the image; ResBlocks in 0-2, EfficientViT blocks in 3-5;
every stage but the last ends in a x2 downsampler) -> conv_out + a channel-averaging shortcut. The decoder
mirrors it: conv_in + a channel-repeating shortcut -> stages 5..0 (each but the last starts with a x2
upsampler) -> RMSNorm -> act -> conv_out. Every norm is an RMSNorm over channels with weight and bias, eps 1e-5
(efficientvit "trms2d"). Big images run in overlapping tiles (`DCAE.decode`, `DCAE.encode`; `dcae_tiling`).
Reading and writing diffusers' config.json: `checkpoints/dcae.py`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import precision
from .dcae_tiling import Progress, peak_activation_bytes, run_pass
from .spec import LATENT_SCALE

log = logging.getLogger(__name__)

ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "relu": F.relu}
BLOCKS = ("ResBlock", "EfficientViTBlock")
_R, _E = "ResBlock", "EfficientViTBlock"


@dataclass(frozen=True)
class DCAEConfig:
    in_channels: int = 3                 # image channels
    latent_channels: int = 32            # latent channels (the "c32")
    # Per stage i, working at 1/2^i of the image size (6 stages = f32): channels, number of blocks, block type
    # ("ResBlock" or "EfficientViTBlock") and the kernel sizes of the multi-scale q/k/v aggregation branches of
    # EfficientViT blocks. Only the decoder's stage 0 may have 0 blocks: it then holds no weights (its width is
    # unused) and the decoder ends in an upsampler instead of a conv.
    encoder_widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_depths: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    encoder_blocks: tuple[str, ...] = (_R, _R, _R, _E, _E, _E)
    encoder_scales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_depths: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    decoder_blocks: tuple[str, ...] = (_R, _R, _R, _E, _E, _E)
    decoder_scales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    attention_head_dim: int = 32         # channels per linear-attention head (heads = width // 32)
    downsample: str = "Conv"             # "Conv": stride-2 3x3 conv | "pixel_unshuffle": conv to C/4, space-to-channel
    upsample: str = "interpolate"        # "interpolate": nearest x2, 3x3 conv | "pixel_shuffle": conv to 4C, to space
    decoder_act: str = "silu"            # activation inside decoder ResBlocks (encoder ResBlocks and GLUMBConvs: SiLU)
    decoder_out_act: str = "relu"        # activation between the decoder's last RMSNorm and conv_out
    scaling_factor: float = LATENT_SCALE  # DiT latent = raw latent * scaling_factor

    def __post_init__(self):
        n = len(self.encoder_widths)
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.startswith(("encoder_", "decoder_")) and isinstance(v, tuple) and len(v) != n:
                raise ValueError(f"DCAEConfig.{f.name}: expected {n} stages (one per encoder width), got {v}")
        bad = [b for b in self.encoder_blocks + self.decoder_blocks if b not in BLOCKS]
        checks = [("block types", not bad, f"{bad} (valid: {BLOCKS})"),
                  ("downsample", self.downsample in ("Conv", "pixel_unshuffle"), repr(self.downsample)),
                  ("upsample", self.upsample in ("interpolate", "pixel_shuffle"), repr(self.upsample)),
                  ("decoder_act", self.decoder_act in ACTS, repr(self.decoder_act)),
                  ("decoder_out_act", self.decoder_out_act in ACTS, repr(self.decoder_out_act)),
                  ("encoder_depths", self.encoder_depths[0] > 0, f"{self.encoder_depths} (stage 0 needs blocks)"),
                  ("decoder_depths", all(self.decoder_depths[1:]), f"{self.decoder_depths} (only stage 0 may be 0)")]
        for name, ok, found in checks:
            if not ok:
                raise ValueError(f"DCAEConfig.{name}: unsupported value {found}")

    @property
    def factor(self) -> int:
        """Spatial compression (32)."""
        return 2 ** (len(self.encoder_widths) - 1)


_SANA = DCAEConfig()
#: The Sana DC-AEs (all f32c32 with the same encoder). 1.0 and 1.1 share the architecture (1.1 is retrained);
#: the lite one has an all-ResBlock decoder with pixel-shuffle upsampling (mit-han-lab efficientvit
#: `dc_ae_f32c32`: decoder depths [0,3,5,4,4,4], out_act silu).
VARIANTS: dict[str, DCAEConfig] = {
    "dc-ae-f32c32-sana-1.0": _SANA,
    "dc-ae-f32c32-sana-1.1": _SANA,
    "dc-ae-lite-f32c32-sana-1.1": replace(_SANA, decoder_depths=(0, 3, 5, 4, 4, 4), decoder_blocks=(_R,) * 6,
                                          decoder_scales=((),) * 6, upsample="pixel_shuffle", decoder_out_act="silu"),
}


def rms_norm_2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the channels of (B, C, H, W): the mean square in fp32, then the (B, 1, H, W) scale, weight and
    bias applied in x's dtype (one multiply and one fused multiply-add)."""
    # an fp32 norm: a bf16 one is 20x faster on the CPU but makes the decode's bf16 error ~1% larger than diffusers'
    ms = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32).square_().div_(x.shape[1])
    scale = torch.rsqrt(ms.add_(eps)).to(x.dtype)
    return torch.addcmul(bias.to(x.dtype)[:, None, None], x * scale, weight.to(x.dtype)[:, None, None])


class RMSNorm2d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_2d(x, self.weight, self.bias)


def linear_attention(qkv: torch.Tensor, head_dim: int, eps: float = 1e-15) -> torch.Tensor:
    """ReLU linear attention over all H*W positions, accumulated in fp32.

    qkv: (B, heads * 3 * head_dim, H, W), each head's channels being [q | k | v]. Returns (B, heads * head_dim,
    H, W) in qkv's dtype: out_n = sum_m (q_n . k_m) v_m / (sum_m q_n . k_m + eps), q and k after ReLU.
    """
    B, _, H, W = qkv.shape
    q, k, v = qkv.float().reshape(B, -1, 3 * head_dim, H * W).chunk(3, dim=2)  # 3 x (B, nh, d, N)
    q, k = F.relu(q), F.relu(k)
    v = F.pad(v, (0, 0, 0, 1), value=1.0)          # (B, nh, d+1, N): the ones row yields the denominator
    out = (v @ k.transpose(-1, -2)) @ q             # (B, nh, d+1, d) @ (B, nh, d, N) -> (B, nh, d+1, N)
    out = out[:, :, :-1] / (out[:, :, -1:] + eps)   # (B, nh, d, N)
    return out.reshape(B, -1, H, W).to(qkv.dtype)


class ResBlock(nn.Module):
    """x + RMSNorm(conv2(act(conv1(x)))), 3x3 convs (conv2 without bias)."""

    def __init__(self, ch: int, act: str, ops: Any):
        super().__init__()
        self.conv1 = ops.Conv2d(ch, ch, 3, 1, 1)
        self.conv2 = ops.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.norm = RMSNorm2d(ch)
        self.act = ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(self.act(self.conv1(x))))


class MultiscaleProjection(nn.Module):
    """One aggregation branch: depthwise kxk conv, then a 1x1 conv grouped per head and per q/k/v."""

    def __init__(self, ch: int, heads: int, kernel: int, ops: Any):
        super().__init__()
        self.proj_in = ops.Conv2d(ch, ch, kernel, padding=kernel // 2, groups=ch, bias=False)
        self.proj_out = ops.Conv2d(ch, ch, 1, groups=3 * heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))


class MultiscaleLinearAttention(nn.Module):
    """x + RMSNorm(to_out(linear attention over [qkv, branch_1(qkv), ...])) (efficientvit `LiteMLA`).

    to_q, to_k, to_v are the three thirds of efficientvit's fused qkv projection, not q, k and v: concatenated
    they form heads of [q | k | v] (see `linear_attention`). Each aggregation branch adds as many heads again.
    """

    def __init__(self, ch: int, head_dim: int, scales: tuple[int, ...], ops: Any):
        super().__init__()
        heads = ch // head_dim
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q = ops.Linear(ch, inner, bias=False)
        self.to_k = ops.Linear(ch, inner, bias=False)
        self.to_v = ops.Linear(ch, inner, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleProjection(3 * inner, heads, k, ops) for k in scales)
        self.to_out = ops.Linear(inner * (1 + len(scales)), ch, bias=False)
        self.norm_out = RMSNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        h = x.movedim(1, -1)                                                         # (B, H, W, C)
        qkv = torch.cat([self.to_q(h), self.to_k(h), self.to_v(h)], -1).movedim(-1, 1)  # (B, 3*inner, H, W)
        qkv = torch.cat([qkv, *(branch(qkv) for branch in self.to_qkv_multiscale)], 1)  # (B, 3*inner*(1+S), H, W)
        out = linear_attention(qkv, self.head_dim)                                   # (B, inner*(1+S), H, W)
        return x + self.norm_out(self.to_out(out.movedim(1, -1)).movedim(-1, 1))


class GLUMBConv(nn.Module):
    """x + RMSNorm(1x1(h * SiLU(gate))), [h, gate] = depthwise3x3(SiLU(1x1(x))), hidden = 4 C."""

    def __init__(self, ch: int, ops: Any, expand: int = 4):
        super().__init__()
        hidden = expand * ch
        self.conv_inverted = ops.Conv2d(ch, 2 * hidden, 1)
        self.conv_depth = ops.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = ops.Conv2d(hidden, ch, 1, bias=False)
        self.norm = RMSNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.conv_depth(F.silu(self.conv_inverted(x))).chunk(2, dim=1)  # 2 x (B, 4C, H, W)
        return x + self.norm(self.conv_point(h * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    def __init__(self, ch: int, head_dim: int, scales: tuple[int, ...], ops: Any):
        super().__init__()
        self.attn = MultiscaleLinearAttention(ch, head_dim, scales, ops)
        self.conv_out = GLUMBConv(ch, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


class Downsample(nn.Module):
    """(B, Cin, H, W) -> (B, Cout, H/2, W/2): conv + space-to-channel of the input averaged over channel groups."""

    def __init__(self, cin: int, cout: int, kind: str, ops: Any):
        super().__init__()
        self.unshuffle = kind == "pixel_unshuffle"
        self.conv = ops.Conv2d(cin, cout // 4 if self.unshuffle else cout, 3, 1 if self.unshuffle else 2, 1)
        self.group = cin * 4 // cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = F.pixel_unshuffle(y, 2) if self.unshuffle else y
        return y + F.pixel_unshuffle(x, 2).unflatten(1, (-1, self.group)).mean(2)


class Upsample(nn.Module):
    """(B, Cin, H, W) -> (B, Cout, 2H, 2W): conv [+ channel-to-space of the input repeated channel-wise]."""

    def __init__(self, cin: int, cout: int, kind: str, ops: Any, shortcut: bool = True):
        super().__init__()
        self.interpolate = kind == "interpolate"
        self.conv = ops.Conv2d(cin, cout if self.interpolate else 4 * cout, 3, 1, 1)
        self.repeats = cout * 4 // cin if shortcut else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            y = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        else:
            y = F.pixel_shuffle(self.conv(x), 2)
        if not self.repeats:
            return y
        if self.repeats not in (1, 2, 4):
            return y + F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)
        # pixel_shuffle(repeat_interleave(x, r)) at (c, 2i + a, 2j + b) is x[(4c + 2a + b) // r] at (i, j): added
        # in place through broadcasting views, without materialising the repeated tensor
        B, C, H, W = y.shape
        r = self.repeats
        src = x.view(B, C, 2 if r < 4 else 1, 2 if r == 1 else 1, H // 2, W // 2)   # (B, C, a, b, i, j)
        y.view(B, C, H // 2, 2, W // 2, 2).add_(src.permute(0, 1, 4, 2, 5, 3))   # y as (B, C, i, a, j, b)
        return y


def _blocks(kind: str, depth: int, ch: int, act: str, scales: tuple[int, ...], cfg: DCAEConfig, ops: Any) -> list:
    if kind == _R:
        return [ResBlock(ch, act, ops) for _ in range(depth)]
    return [EfficientViTBlock(ch, cfg.attention_head_dim, scales, ops) for _ in range(depth)]


class Encoder(nn.Module):
    def __init__(self, cfg: DCAEConfig, ops: Any):
        super().__init__()
        w, d, n = cfg.encoder_widths, cfg.encoder_depths, len(cfg.encoder_widths)
        self.conv_in = ops.Conv2d(cfg.in_channels, w[0], 3, 1, 1)
        self.down_blocks = nn.ModuleList(
            nn.Sequential(*_blocks(cfg.encoder_blocks[i], d[i], w[i], "silu", cfg.encoder_scales[i], cfg, ops),
                          *([Downsample(w[i], w[i + 1], cfg.downsample, ops)] if i < n - 1 else []))
            for i in range(n))
        self.conv_out = ops.Conv2d(w[-1], cfg.latent_channels, 3, 1, 1)
        self.group = w[-1] // cfg.latent_channels

    def forward(self, x: torch.Tensor, tick: Callable[[], None] = lambda: None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 32, H/32, W/32); `tick()` after every block (progress and cancel points)."""
        h = self.conv_in(x)
        for stage in self.down_blocks:
            for block in stage:
                h = block(h)
                tick()
        return self.conv_out(h) + h.unflatten(1, (-1, self.group)).mean(2)


class Decoder(nn.Module):
    def __init__(self, cfg: DCAEConfig, ops: Any):
        super().__init__()
        w, d, n = cfg.decoder_widths, cfg.decoder_depths, len(cfg.decoder_widths)
        self.conv_in = ops.Conv2d(cfg.latent_channels, w[-1], 3, 1, 1)
        self.repeats = w[-1] // cfg.latent_channels
        self.up_blocks = nn.ModuleList(
            nn.Sequential(*([Upsample(w[i + 1], w[i], cfg.upsample, ops)] if i < n - 1 and d[i] else []),
                          *_blocks(cfg.decoder_blocks[i], d[i], w[i], cfg.decoder_act, cfg.decoder_scales[i], cfg, ops))
            for i in range(n))
        last = w[0] if d[0] else w[1]
        self.norm_out = RMSNorm2d(last)
        self.act = ACTS[cfg.decoder_out_act]
        self.conv_out = (ops.Conv2d(last, cfg.in_channels, 3, 1, 1) if d[0]
                         else Upsample(last, cfg.in_channels, cfg.upsample, ops, shortcut=False))

    def forward(self, z: torch.Tensor, tick: Callable[[], None] = lambda: None) -> torch.Tensor:
        """(B, 32, h, w) -> (B, 3, 32h, 32w); `tick()` after every block (progress and cancel points)."""
        h = self.conv_in(z) + z.repeat_interleave(self.repeats, dim=1)
        for stage in reversed(self.up_blocks):
            for block in stage:
                h = block(h)
                tick()
        return self.conv_out(self.act(self.norm_out(h)))


class DCAE(nn.Module):
    """The autoencoder. `encoder=False` builds a decoder-only model (for decoder-only weight files)."""

    def __init__(self, cfg: DCAEConfig = _SANA, ops: Any = None, encoder: bool = True):
        super().__init__()
        ops = ops or nn
        self.cfg = cfg
        self.encoder = Encoder(cfg, ops) if encoder else None
        self.decoder = Decoder(cfg, ops)
        self.source, self.variant = "this DC-AE", None  # weight file (for messages) and variant, set by the loader

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> the DiT's latent space."""
        return z * self.cfg.scaling_factor

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """The DiT's latent space -> raw latent."""
        return z / self.cfg.scaling_factor

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def widen(self, dtype: torch.dtype) -> None:
        """Compute in `dtype` from now on (the weights are converted; see `precision.run_finite`)."""
        self.to(dtype)

    def encode(self, x: torch.Tensor, tiled: bool | None = None, tile_size: int | None = None,
               overlap: int | None = None, max_memory: int | None = None,
               progress: Progress | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1], H and W multiples of 32 -> raw latents (B, 32, H/32, W/32).

        tiled: None tiles when the untiled pass would need more than `max_memory` bytes (default: the device's
        free memory) or runs out of memory; True/False forces. tile_size: the largest tile in image pixels
        (default: the largest of 256..2048 px that fits the memory); overlap: pixels neighbouring tiles share
        at least (default, and the most with an automatic tile: a quarter of the tile, at most 256). Both
        multiples of 32. A tiled pass that runs out of memory is repeated with tiles half as wide.
        progress(done, total) is called after every block of every tile (a host can show it and cancel there).
        """
        if self.encoder is None:
            raise ValueError(f"{self.source}: encoder weights are missing (a decoder-only DC-AE file), so this model "
                             "can decode but not encode; load a full DC-AE to encode images")
        f = self.cfg.factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"DC-AE encode: image size {x.shape[-2]}x{x.shape[-1]} is not a multiple of {f}; "
                             "crop or pad it")
        return self._run(x, tiled, tile_size, overlap, max_memory, progress, decode=False)

    def decode(self, z: torch.Tensor, tiled: bool | None = None, tile_size: int | None = None,
               overlap: int | None = None, max_memory: int | None = None,
               progress: Progress | None = None) -> torch.Tensor:
        """Raw latents (B, 32, h, w) -> images (B, 3, 32h, 32w), roughly in [-1, 1]. Options as in `encode`."""
        return self._run(z, tiled, tile_size, overlap, max_memory, progress, decode=True)

    def memory_needed(self, shape: tuple[int, ...], dtype: torch.dtype, decode: bool = True) -> int:
        """Estimated peak activation bytes of an untiled decode of latents (or encode of images) of `shape`."""
        return self._activation_bytes(shape[0], shape[-2] * shape[-1] * (self.cfg.factor**2 if decode else 1),
                                      dtype, decode)

    def _activation_bytes(self, batch: int, pixels: int, dtype: torch.dtype, decode: bool) -> int:
        """Estimated peak activation bytes of a pass over `batch` images of `pixels` image pixels each."""
        widths, depths = ((self.cfg.decoder_widths, self.cfg.decoder_depths) if decode
                          else (self.cfg.encoder_widths, self.cfg.encoder_depths))
        return peak_activation_bytes(widths, depths, batch * pixels, dtype)

    def _run(self, x: torch.Tensor, tiled: bool | None, tile_size: int | None, overlap: int | None,
             max_memory: int | None, progress: Progress | None, decode: bool) -> torch.Tensor:
        """The encoder or decoder on x, whole or in tiles (`dcae_tiling.run_pass`)."""
        net = self.decoder if decode else self.encoder
        x = x.contiguous(memory_format=torch.channels_last)  # as the weights are stored (see load_dcae)
        blocks = sum(len(stage) for stage in (net.up_blocks if decode else net.down_blocks))
        return run_pass(net, x, factor=self.cfg.factor, decode=decode,
                        blocks=blocks, estimate=lambda px: self._activation_bytes(x.shape[0], px, x.dtype, decode),
                        tiled=tiled, tile_size=tile_size, overlap=overlap, max_memory=max_memory, progress=progress)


def run_finite(vae: DCAE, op: str, x: torch.Tensor, **options: Any) -> torch.Tensor:
    """`vae.encode` or `vae.decode` (`op`) of x in the DC-AE's dtype, through `precision.run_finite`: a float16
    DC-AE that overflows is widened with a warning and the pass repeated; inf/NaN otherwise is an error."""
    return precision.run_finite(lambda: getattr(vae, op)(x.to(vae.compute_dtype), **options), vae,
                                f"{vae.source}: the DC-AE {op}r")
