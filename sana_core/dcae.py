"""DC-AE, Sana's deep-compression autoencoder (f32c32: RGB -> 32 latent channels at 1/32 of the size).

Parameter names follow diffusers' `AutoencoderDC`, so diffusers files load as they are; mit-han-lab's
efficientvit files go through `checkpoints/dcae.py`. Images are (B, 3, H, W) in [-1, 1], H and W multiples of
32; raw latents are (B, 32, H/32, W/32); the DiT works on `scale(raw) = raw * 0.41407`.

Encoder: conv_in -> 6 stages (stage i at 1/2^i of the image; ResBlocks in 0-2, EfficientViT blocks in 3-5;
every stage but the last ends in a x2 downsampler) -> conv_out + a channel-averaging shortcut. The decoder
mirrors it: conv_in + a channel-repeating shortcut -> stages 5..0 (each but the last starts with a x2
upsampler) -> RMSNorm -> act -> conv_out. Every norm is an RMSNorm over channels with weight and bias, eps 1e-5
(efficientvit "trms2d"). Big images run in overlapping tiles (`DCAE.decode`, `DCAE.encode`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import precision

log = logging.getLogger(__name__)

MIN_TILE, MAX_TILE = 256, 2048  # automatic tile sizes in image pixels (bigger tiles gain little, use more memory)
Progress = Callable[[int, int], None]  # (blocks done, blocks in all): after every block of every tile
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
    scaling_factor: float = 0.41407      # DiT latent = raw latent * scaling_factor

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

    @classmethod
    def from_diffusers(cls, config: dict) -> DCAEConfig:
        """Read a diffusers `AutoencoderDC` config.json; ValueError for options no Sana DC-AE uses."""
        n = len(config["encoder_block_out_channels"])

        def stages(key: str, default: Any = None) -> tuple:  # per-stage values; a string means all stages
            v = config[key] if default is None else config.get(key, default)
            return (v,) * n if isinstance(v, str) else tuple(tuple(s) if isinstance(s, list) else s for s in v)

        norms, acts = set(stages("decoder_norm_types", "rms_norm")), set(stages("decoder_act_fns", "silu"))
        if norms != {"rms_norm"} or len(acts) != 1:
            raise ValueError(f"decoder_norm_types {sorted(norms)} / decoder_act_fns {sorted(acts)}: only RMSNorm and "
                             "one activation for all stages are supported (as in every Sana DC-AE)")
        if not (config.get("encoder_out_shortcut", True) and config.get("decoder_in_shortcut", True)):
            raise ValueError("encoder_out_shortcut / decoder_in_shortcut = false is not supported (Sana uses both)")
        enc_blocks, dec_blocks = stages("encoder_block_types"), stages("decoder_block_types")
        return cls(
            in_channels=config["in_channels"], latent_channels=config["latent_channels"],
            encoder_widths=stages("encoder_block_out_channels"), encoder_depths=stages("encoder_layers_per_block"),
            encoder_blocks=enc_blocks, encoder_scales=_scales(enc_blocks, stages("encoder_qkv_multiscales")),
            decoder_widths=stages("decoder_block_out_channels"), decoder_depths=stages("decoder_layers_per_block"),
            decoder_blocks=dec_blocks, decoder_scales=_scales(dec_blocks, stages("decoder_qkv_multiscales")),
            attention_head_dim=config.get("attention_head_dim", 32),
            downsample="pixel_unshuffle" if config["downsample_block_type"] == "pixel_unshuffle" else "Conv",
            upsample="interpolate" if config["upsample_block_type"] == "interpolate" else "pixel_shuffle",
            decoder_act=acts.pop(), decoder_out_act=config.get("decoder_conv_act_fn", "relu"),
            scaling_factor=config.get("scaling_factor", 1.0))

    def to_diffusers(self) -> dict:
        """The config.json diffusers writes for this DC-AE."""
        n = len(self.encoder_widths)
        return {
            "_class_name": "AutoencoderDC", "_diffusers_version": "0.32.0",
            "in_channels": self.in_channels, "latent_channels": self.latent_channels,
            "attention_head_dim": self.attention_head_dim,
            "encoder_block_types": list(self.encoder_blocks), "decoder_block_types": list(self.decoder_blocks),
            "encoder_block_out_channels": list(self.encoder_widths),
            "decoder_block_out_channels": list(self.decoder_widths),
            "encoder_layers_per_block": list(self.encoder_depths),
            "decoder_layers_per_block": list(self.decoder_depths),
            "encoder_qkv_multiscales": [list(s) for s in self.encoder_scales],
            "decoder_qkv_multiscales": [list(s) for s in self.decoder_scales],
            "upsample_block_type": self.upsample, "downsample_block_type": self.downsample,
            "decoder_norm_types": ["rms_norm"] * n, "decoder_act_fns": [self.decoder_act] * n,
            "encoder_out_shortcut": True, "decoder_in_shortcut": True,
            "decoder_conv_act_fn": self.decoder_out_act, "scaling_factor": self.scaling_factor,
        }


def _scales(blocks: tuple[str, ...], scales: tuple) -> tuple[tuple[int, ...], ...]:
    """Multi-scale kernel sizes, kept only for EfficientViT stages (ResBlocks have none)."""
    return tuple(tuple(s) if b == _E else () for b, s in zip(blocks, scales))


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


def peak_activation_bytes(widths: tuple[int, ...], depths: tuple[int, ...], pixels: int, dtype: torch.dtype) -> int:
    """Rough peak activation memory of one untiled encoder or decoder pass over `pixels` image pixels.

    Stage i holds widths[i] channels on pixels / 4^i positions; the peak is about 7 such tensors at the busiest
    stage (calibrated on the Sana 1.0 decoder in bf16: 26.7 GiB measured at 4096x4096 px, 28 GiB estimated).
    """
    per_pixel = max(w / 4**i for i, (w, d) in enumerate(zip(widths, depths)) if d)
    return int(7 * per_pixel * pixels * torch.finfo(dtype).bits // 8)


def tile_plan(length: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """Fewest tiles of at most `tile` covering [0, length) with neighbours sharing >= `overlap`, made as small
    as that count allows (so the tiles overlap no more than needed). Returns (tile length, starts)."""
    if length <= tile:
        return length, [0]
    n = -(-(length - overlap) // (tile - overlap))  # ceil: tiles needed at a stride of tile - overlap
    size = -(-(length + (n - 1) * overlap) // n)    # <= tile; consecutive starts differ by <= size - overlap
    return size, [i * (length - size) // (n - 1) for i in range(n)]


def _ramp(n: int, ramp: int, start: bool, end: bool, device: torch.device) -> torch.Tensor:
    """(n,) blending weights: 1 inside, rising/falling linearly over `ramp` samples on the shared sides."""
    i = torch.arange(n, device=device, dtype=torch.float32) + 0.5
    w = torch.ones(n, device=device)
    if ramp and start:
        w = torch.minimum(w, i / ramp)
    if ramp and end:
        w = torch.minimum(w, (n - i) / ramp)
    return w


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
                scale_in: int, scale_out: int) -> torch.Tensor:
    """Run `fn` on overlapping tiles of x and blend the outputs with linear ramps (weights normalised).

    Sizes are in latent pixels: x has `scale_in` pixels per latent pixel (32 for images, 1 for latents) and
    fn's output `scale_out`. Tiles are at most `tile` latent pixels wide (see `tile_plan`), neighbours share
    >= `overlap`, and each output tile fades over `overlap * scale_out` pixels on its shared sides. Returns fn's
    full-size output.
    """
    B, _, H, W = x.shape
    gh, gw = H // scale_in, W // scale_in
    (th, rows_at), (tw, cols_at) = tile_plan(gh, tile, overlap), tile_plan(gw, tile, overlap)
    out = weight = None
    for y in rows_at:
        for x0 in cols_at:
            t = fn(x[:, :, y * scale_in:(y + th) * scale_in, x0 * scale_in:(x0 + tw) * scale_in])
            if out is None:
                out = torch.zeros(B, t.shape[1], gh * scale_out, gw * scale_out, device=t.device)
                weight = torch.zeros(gh * scale_out, gw * scale_out, device=t.device)
            r = overlap * scale_out
            m = (_ramp(th * scale_out, r, y > 0, y + th < gh, t.device)[:, None]
                 * _ramp(tw * scale_out, r, x0 > 0, x0 + tw < gw, t.device))
            rows, cols = slice(y * scale_out, (y + th) * scale_out), slice(x0 * scale_out, (x0 + tw) * scale_out)
            out[:, :, rows, cols] += t.float() * m
            weight[rows, cols] += m
    return (out / weight).to(t.dtype)


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
        f = self.cfg.factor
        net, scale_in, scale_out = (self.decoder, 1, f) if decode else (self.encoder, f, 1)  # pixels per latent
        blocks = sum(len(stage) for stage in (net.up_blocks if decode else net.down_blocks))
        counter = _Counter(progress, blocks)
        x = x.contiguous(memory_format=torch.channels_last)  # as the weights are stored (see load_dcae)
        budget = free_memory(x.device) if max_memory is None else min(max_memory, free_memory(x.device))
        automatic = tile_size is None
        if automatic:  # the largest tile that fits
            tile_size = next((t for t in range(MAX_TILE, MIN_TILE, -f)
                              if self._activation_bytes(x.shape[0], t * t, x.dtype, decode) <= budget), MIN_TILE)
        quarter = min(256, tile_size // 4) // f * f
        overlap = quarter if overlap is None else min(overlap, quarter) if automatic else overlap
        if tile_size % f or overlap % f or not 0 <= overlap < tile_size:
            raise ValueError(f"DC-AE tiling: tile_size {tile_size} and overlap {overlap} must be multiples of {f} "
                             "with 0 <= overlap < tile_size")

        def whole() -> torch.Tensor:
            counter.start(1)
            return net(x, counter.tick)

        if tiled is None:
            untiled = self.memory_needed(x.shape, x.dtype, decode)
            tiled = untiled > budget
            if tiled:
                log.info("DC-AE: ~%.1f GiB needed untiled, %.1f GiB allowed: %d px tiles", untiled / 2**30,
                         budget / 2**30, tile_size)
            else:
                try:
                    return whole()
                except torch.OutOfMemoryError:
                    log.warning("DC-AE: out of memory on %s; retrying in %d px tiles", tuple(x.shape), tile_size)
                    _release(x.device)
                tiled = True
        if not tiled:
            return whole()
        while True:
            try:
                tile, lap = tile_size // f, overlap // f
                H, W = x.shape[-2] // scale_in, x.shape[-1] // scale_in
                counter.start(len(tile_plan(H, tile, lap)[1]) * len(tile_plan(W, tile, lap)[1]))
                return tiled_apply(lambda t: net(t, counter.tick), x, tile, lap, scale_in, scale_out)
            except torch.OutOfMemoryError:
                if tile_size <= MIN_TILE:
                    raise
                _release(x.device)
                tile_size = max(MIN_TILE, tile_size // 2 // f * f)
                overlap = min(overlap, tile_size // 4 // f * f)
                log.warning("DC-AE: out of memory in tiles; retrying in %d px tiles", tile_size)


class _Counter:
    """Counts blocks over the passes of one encode/decode and reports them to a `Progress` callback."""

    def __init__(self, progress: Progress | None, blocks_per_pass: int):
        self.progress, self.per_pass, self.done, self.total = progress, blocks_per_pass, 0, 0

    def start(self, passes: int) -> None:
        self.done, self.total = 0, passes * self.per_pass

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


def run_finite(vae: DCAE, op: str, x: torch.Tensor, **options: Any) -> torch.Tensor:
    """`vae.encode` or `vae.decode` (`op`) of x in the DC-AE's dtype, through `precision.run_finite`: a float16
    DC-AE that overflows is widened with a warning and the pass repeated; inf/NaN otherwise is an error."""
    return precision.run_finite(lambda: getattr(vae, op)(x.to(vae.compute_dtype), **options), vae,
                                f"{vae.source}: the DC-AE {op}r")


def free_memory(device: torch.device) -> int:
    """Bytes a pass may allocate on `device`: CUDA's free memory plus PyTorch's cached blocks; on Apple GPUs
    the recommended working set less what is allocated; on the CPU the kernel's MemAvailable (Linux; elsewhere
    unlimited)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 2**62


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
