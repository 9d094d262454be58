"""Quantized weights (GGML block types, as stored in GGUF files) kept quantized in memory and dequantized layer by
layer in the compute dtype while the model runs.

A `QuantizedTensor` is the weight's raw blocks, a uint8 tensor (..., bytes per row), that reports the weight's
logical shape: modules built on `meta` load it strictly, `.to(device)` moves the bytes, and memory accounting
(`numel() * element_size()`) counts the bytes really held. `dequantize` turns it into float32 with the same
arithmetic as the `gguf` package's numpy dequantization (bit for bit; tested), then to the compute dtype.

`GGUFOps` is an `ops` namespace for our models (`Linear`, `Conv2d`, `Embedding`) whose layers dequantize their
weight at every call; LoRAs are kept as patches on the weight (`add_lora_patch`) and added after dequantization.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gguf
import torch
import torch.nn.functional as F
from torch import nn

QK_K = 256
T = gguf.GGMLQuantizationType
#: GGML types that stay quantized in memory (the float types become ordinary tensors when read).
QUANTIZED = (T.Q8_0, T.Q6_K, T.Q5_K, T.Q5_1, T.Q5_0, T.Q4_K, T.Q4_1, T.Q4_0)
#: Float types stored as ordinary torch tensors.
FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
SUPPORTED = (*FLOAT_TYPES, *QUANTIZED)


class QuantizedTensor(torch.Tensor):
    """Raw GGML blocks (uint8, shape (..., bytes per row)) of a weight whose logical shape is `logical_shape`.

    `shape` is the logical shape; `size()`/`numel()` are the bytes'. Moving, detaching or pinning keeps the type,
    the shape and the LoRA `patches`; any other operation gives a plain uint8 tensor.
    """

    qtype: T
    logical_shape: torch.Size
    patches: list

    @staticmethod
    def __new__(cls, raw: torch.Tensor, qtype: T, shape: Sequence[int], patches: list | None = None):
        t = raw.as_subclass(cls)
        t.qtype, t.logical_shape, t.patches = T(qtype), torch.Size(shape), [] if patches is None else patches
        return t

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        return self.logical_shape

    def __repr__(self) -> str:
        return (f"QuantizedTensor({self.qtype.name}, shape={tuple(self.logical_shape)}, "
                f"device={self.device}, patches={len(self.patches)})")

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: Sequence = (), kwargs: dict | None = None) -> Any:
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        src = args[0] if args and isinstance(args[0], QuantizedTensor) else None
        if (src is not None and func in _KEEP and isinstance(out, torch.Tensor) and out.dtype == torch.uint8
                and not isinstance(out, QuantizedTensor)):
            return QuantizedTensor(out, src.qtype, src.logical_shape, src.patches)
        return out


_KEEP = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.detach, torch.Tensor.clone,
         torch.Tensor.pin_memory, torch.Tensor.contiguous, torch.Tensor.requires_grad_, torch.Tensor.share_memory_}


def raw_shape(shape: Sequence[int], qtype: T) -> tuple[int, ...]:
    """Shape of the raw bytes of a tensor of logical `shape` in `qtype`; ValueError if rows do not split in blocks."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} values do not split into {qtype.name} blocks of {block}")
    return (*shape[:-1], shape[-1] // block * size)


def bytes_of(shape: Sequence[int], qtype: T) -> int:
    """Bytes a tensor of logical `shape` takes in `qtype`."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for s in shape:
        n *= s
    return n // block * size


# --- dequantization: float32, the arithmetic of gguf.quants (numpy) in torch -------------------------------------

def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32 from float16."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """(n, groups * k) bytes -> (n, groups, 2, k): low nibbles then high nibbles of each group of k bytes."""
    qs = qs.reshape(qs.shape[0], groups, 1, -1)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """(n, count // 8) little-endian bytes -> (n, count) bits as uint8."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh[..., None] >> shifts) & 1).reshape(qh.shape[0], count)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes of a Q4_K/Q5_K block -> 2 x (n, 8) float32."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 1).reshape(b.shape[0], 32).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:], 1).reshape(b.shape[0], 32).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q5(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The 5-bit values (n, 32) of Q5_0 (offset 2) / Q5_1 (offset 4): 4 bytes of high bits, 16 of nibbles."""
    high = _bits(b[:, offset:offset + 4], 32)
    return _nibbles(b[:, offset + 4:], 1).reshape(b.shape[0], 32) | (high << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (_q5(b, 2).to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _q5(b, 4).float() + _f16(b[:, 2:4])


def _k4(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 8 sub-blocks of 32 values q (n, 8, 32) float32 -> d * scale * q - dmin * min (n, 256)."""
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc).reshape(-1, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn).reshape(-1, 8, 1)
    return (d * q - dm).reshape(-1, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    return _k4(b, _nibbles(b[:, 16:], 4).reshape(-1, 8, 32).float())


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    low = _nibbles(b[:, 48:], 4).reshape(-1, 8, 32)
    high = ((b[:, 16:48].reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device)[:, None]) & 1)
    return _k4(b, (low | (high << 4)).float())


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    low = _nibbles(b[:, :128], 2).reshape(n, 8, 32)                                  # ql: 2 x 64 bytes
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    high = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)   # qh: 2 x 32 bytes
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    d = (_f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    return (d * q).reshape(n, QK_K)


_BLOCKS: dict[T, Callable[[torch.Tensor], torch.Tensor]] = {
    T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1,
    T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}


def dequantize_raw(raw: torch.Tensor, qtype: T, shape: Sequence[int]) -> torch.Tensor:
    """Raw GGML bytes (..., bytes per row) of `qtype` -> float32 tensor of logical `shape` (the gguf package's
    numpy arithmetic, bit for bit)."""
    qtype = T(qtype)
    if qtype in FLOAT_TYPES:
        return raw.contiguous().view(FLOAT_TYPES[qtype]).float().reshape(shape)
    if qtype not in _BLOCKS:
        raise ValueError(f"GGML type {qtype.name} is not supported; supported: {', '.join(t.name for t in SUPPORTED)}")
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    return _BLOCKS[qtype](raw.reshape(-1, size)).reshape(shape)


def dequantize(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A weight as a plain tensor in `dtype` (None: float32 for a quantized one, else its own): a
    `QuantizedTensor` is dequantized in float32, its LoRA patches added in float32, then cast."""
    if not isinstance(t, QuantizedTensor):
        return t if dtype is None else t.to(dtype)
    w = dequantize_raw(t.as_subclass(torch.Tensor), t.qtype, t.logical_shape)
    for patch in t.patches:
        w = patch(w)
    return w if dtype is None else w.to(dtype)


# --- LoRA patches ------------------------------------------------------------------------------------------------

class LoraPatch:
    """w[start:start + rows] += factor * (up @ down), in float32 (as `lora.merge_lora` adds it to a plain weight)."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, factor: float, start: int = 0, rows: int | None = None):
        self.up, self.down, self.factor, self.start, self.rows = up, down, factor, start, rows

    def delta(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        up, down = self.up.to(device, torch.float32), self.down.to(device, torch.float32)
        return (up @ down).mul_(self.factor).reshape(shape)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        part = w if self.rows is None else w.narrow(0, self.start, self.rows)
        part.add_(self.delta(part.shape, w.device).to(w.dtype))
        return w


def add_lora_patch(weight: QuantizedTensor, patch: LoraPatch) -> None:
    """Keep a LoRA on a quantized weight: it is added at every dequantization."""
    weight.patches.append(patch)


# --- layers -------------------------------------------------------------------------------------------------------

def _weights(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight and bias on x's device in x's dtype (quantized ones dequantized)."""
    w = dequantize(layer.weight.to(x.device), x.dtype)
    b = None if layer.bias is None else dequantize(layer.bias.to(x.device), x.dtype)
    return w, b


class QuantizedLoad:
    """Mixin of layers that accept `QuantizedTensor` weights from `load_state_dict(assign=True)` (they are
    integer bytes, so the parameter is made without gradient)."""

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name, p in self.named_parameters(recurse=False):
            if isinstance(state_dict.get(prefix + name), QuantizedTensor):
                p.requires_grad_(False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GGUFOps:
    """`ops` namespace whose layers dequantize quantized weights at each call (plain weights are cast to the
    input's dtype), so a model computes in the dtype of its inputs whatever its storage."""

    quantized = True  # loaders check this before building a model with quantized weights

    class Linear(QuantizedLoad, nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, *_weights(self, x))

    class Conv2d(QuantizedLoad, nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, *_weights(self, x))

    class Embedding(QuantizedLoad, nn.Embedding):
        """Only the rows looked up are dequantized (GGML blocks run along a row), output in `out_dtype` (the
        model's compute dtype; None: float32), times `embed_scale` when the replaced layer had one
        (transformers' Gemma2TextScaledWordEmbedding)."""

        out_dtype: torch.dtype | None = None

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            w = self.weight
            if not isinstance(w, QuantizedTensor):
                return F.embedding(ids, w, self.padding_idx)
            if w.patches:
                raise ValueError("a LoRA on a quantized embedding table is not supported")
            rows = w.as_subclass(torch.Tensor)[ids.flatten()]
            out = dequantize_raw(rows, w.qtype, (ids.numel(), w.logical_shape[-1])).reshape(*ids.shape, -1)
            out = out if self.out_dtype is None else out.to(self.out_dtype)
            scale = getattr(self, "embed_scale", None)
            return out if scale is None else out * scale.to(out.dtype)


def swap_layers(model: nn.Module, quantized: Callable[[str], bool], dtype: torch.dtype) -> int:
    """Make the `nn.Linear` / `nn.Embedding` / `nn.Conv2d` modules of a model built elsewhere (e.g. transformers'
    Gemma2Model) whose weight `quantized(name)` says is quantized into `GGUFOps` layers, in place (embeddings
    then return `dtype`, the model's compute dtype; a subclass's own forward is replaced, so it must be one whose
    extra is an `embed_scale`, as transformers' scaled word embeddings); returns how many."""
    kinds = ((nn.Linear, GGUFOps.Linear), (nn.Embedding, GGUFOps.Embedding), (nn.Conv2d, GGUFOps.Conv2d))
    n = 0
    for name, module in model.named_modules():
        for base, ours in kinds:
            if isinstance(module, base) and quantized(f"{name}.weight"):
                module.__class__ = ours
                module.out_dtype = dtype
                n += 1
    return n


def is_quantized(t: Any) -> bool:
    return isinstance(t, QuantizedTensor)


def cat_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate weights on dim 0 (fused q/k/v): quantized ones of one type stay quantized (their rows are
    whole blocks); mixed types are dequantized to float32 first."""
    if all(isinstance(p, QuantizedTensor) for p in parts) and len({p.qtype for p in parts}) == 1:
        raw = torch.cat([p.as_subclass(torch.Tensor) for p in parts], dim=0)
        shape = (sum(p.logical_shape[0] for p in parts), *parts[0].logical_shape[1:])
        return QuantizedTensor(raw, parts[0].qtype, shape)
    if any(isinstance(p, QuantizedTensor) for p in parts):
        return torch.cat([dequantize(p, torch.float32) for p in parts], dim=0)
    return torch.cat(list(parts), dim=0)
