"""`python -m sana_core.quantize IN OUT --type Q8_0`: write a GGUF of a Sana DiT or of Gemma-2 from any file or
folder our loaders read.

    python -m sana_core.quantize Sana_1600M_1024px_BF16.pth sana_1600m_Q8_0.gguf --type Q8_0
    python -m sana_core.quantize ./gemma-2-2b-it gemma-2-2b-it-Q4_K.gguf --type Q4_K

What is quantized: the matrices of the transformer blocks (DiT: self/cross-attention q/k/v/out and the Mix-FFN's
1x1 convs; Gemma: attention and MLP projections and the token embedding, as llama.cpp does). Everything else
keeps the file's precision (F32/F16/BF16): norms, biases and the per-block modulation tables are tiny and set the
scale of every activation; the DiT's embedders (patch, timestep, caption) and its final layer are small and sit
at the ends of the network, where errors are not averaged out; the depthwise 3x3 conv (rows of 9) cannot be cut
into blocks. A matrix whose rows do not split into the type's blocks takes llama.cpp's fallback type (K-quants
need rows of 256: Sana's widths 1152/2240 do not, so Q4_K/Q5_K/Q6_K fall back to Q5_0/Q5_1/Q8_0 there; Gemma's
2304/9216 do). The file records the model, the DiT's config (what the weights cannot tell: heads, the 2K/4K
positional embedding, timestep scales) and the Gemma tokenizer, so it loads alone.

Q8_0, Q5_0, Q5_1, Q4_0, Q4_1 are quantized by the `gguf` package (llama.cpp's reference rounding); Q4_K, Q5_K and
Q6_K by the simple min/max rounding below (llama.cpp searches each block's scale for the least error instead,
so its K-quant files are somewhat more accurate; ours read the same way).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .quantized import FLOAT_TYPES, QK_K, T

log = logging.getLogger("sana_core.quantize")

TYPES = ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0")
#: llama.cpp's replacement when rows do not split into a K-quant's 256-value blocks.
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
DIT_QUANTIZED = re.compile(r"blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj)|"
                           r"mlp\.(inverted_conv|point_conv)\.conv)\.weight")
GEMMA_QUANTIZED = re.compile(r"(layers\.\d+\.(self_attn|mlp)\.\w+_proj|embed_tokens)\.weight")


# --- K-quants (min/max rounding) ----------------------------------------------------------------------------------

def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _scales_6bit(scale: np.ndarray, lo: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-sub-block values (n, k) >= 0 -> (super-block factor (n,) float16-rounded, 6-bit codes (n, k))."""
    d = (scale.max(axis=1) / 63).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(d[:, None] > 0, np.rint(scale / d[:, None]), 0)
    return d, np.clip(codes, lo, 63).astype(np.uint8)


def _pack_scale_min(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> the 12 bytes of a Q4_K/Q5_K block (inverse of ggml's get_scale_min_k4)."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _quantize_k_asym(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K (15 levels) / Q5_K (31): blocks x (n, 256) -> (header bytes (n, 16), codes (n, 8, 32) uint8)."""
    sub = x.reshape(-1, 8, 32)
    low = np.minimum(sub.min(axis=2), 0)                              # (n, 8): the offset is a min <= 0
    d, sc = _scales_6bit((sub.max(axis=2) - low) / levels)
    dmin, mn = _scales_6bit(-low)
    step, offset = (d[:, None] * sc)[..., None], (dmin[:, None] * mn)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, np.rint((sub + offset) / step), 0)
    header = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min(sc, mn)], axis=1)
    return header, np.clip(q, 0, levels).astype(np.uint8)


def _nibble_pack(q: np.ndarray) -> np.ndarray:
    """(n, 8, 32) codes -> (n, 128) bytes: sub-blocks 2c and 2c+1 in the low and high nibbles of chunk c."""
    q = q.reshape(-1, 4, 2, 32)
    return ((q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)).reshape(-1, 128)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    header, q = _quantize_k_asym(x, 15)
    return np.concatenate([header, _nibble_pack(q)], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    header, q = _quantize_k_asym(x, 31)
    high = ((q >> 4) & 1).astype(np.uint8)                          # (n, 8, 32): bit j of byte i = sub-block j
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return np.concatenate([header[:, :4], header[:, 4:16], qh, _nibble_pack(q)], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K: 16 sub-blocks of 16 signed 6-bit values, int8 scales, one float16 factor."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = np.abs(sub).max(axis=2) / 31                            # (n, 16)
    d = (scale.max(axis=1) / 127).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.where(d[:, None] > 0, np.rint(scale / d[:, None]), 0), -128, 127).astype(np.int8)
        step = (d[:, None] * sc)[..., None]
        q = np.where(step != 0, np.rint(sub / step), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)    # halves of 128 values
    ql = ((q[:, :, :64] & 15) | ((q[:, :, 64:] & 15) << 4)).reshape(n, 128)
    h = (q >> 4).reshape(n, 2, 4, 32)
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)


_OURS: dict[T, Callable[[np.ndarray], np.ndarray]] = {T.Q4_K: quantize_q4_k, T.Q5_K: quantize_q5_k,
                                                      T.Q6_K: quantize_q6_k}


def quantize_array(x: np.ndarray, qtype: T) -> np.ndarray:
    """float32 (..., row) -> raw GGML bytes (..., row bytes) of `qtype` (rows must split into its blocks)."""
    import gguf

    if qtype in _OURS:
        rows = x.reshape(-1, QK_K).astype(np.float32)
        return _OURS[qtype](rows).reshape(*x.shape[:-1], -1)
    return gguf.quants.quantize(x.astype(np.float32), qtype)


def fits(shape: tuple[int, ...], qtype: T) -> bool:
    import gguf

    return shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def pick_type(name: str, shape: tuple[int, ...], qtype: T, pattern: re.Pattern) -> T | None:
    """The type a tensor is written in: `qtype`, its fallback when rows do not fit, or None (file precision)."""
    if qtype in FLOAT_TYPES or not pattern.fullmatch(name) or len(shape) != 2:
        return qtype if qtype in FLOAT_TYPES and len(shape) >= 1 else None
    for candidate in (qtype, FALLBACK.get(qtype), T.Q8_0):
        if candidate is not None and fits(shape, candidate):
            return candidate
    return None


# --- writing ------------------------------------------------------------------------------------------------------

def _float_entry(t: torch.Tensor) -> tuple[np.ndarray, T]:
    """A tensor kept in float: (numpy data, its GGML type); bf16 as raw bytes (numpy has no bfloat16)."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.uint8).numpy(), T.BF16
    if t.dtype == torch.float16:
        return t.numpy(), T.F16
    return t.float().numpy(), T.F32


def write_gguf(path: Path, sd: dict[str, torch.Tensor], qtype: T, pattern: re.Pattern, arch: str,
               metadata: Callable[[object], None] = lambda writer: None) -> dict[str, int]:
    """Write `sd` to a GGUF at `path`, quantizing what `pattern` selects; returns {GGML type name: tensors}."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    metadata(writer)
    counts: dict[str, int] = {}
    for name in list(sd):
        t = sd.pop(name).detach().cpu().contiguous()
        shape = tuple(t.shape)
        target = pick_type(name, shape, qtype, pattern) if t.is_floating_point() else None
        if target is None:
            data, target = _float_entry(t)
        elif target in FLOAT_TYPES:
            data, target = _float_entry(t.to(FLOAT_TYPES[target]))
        else:
            data = quantize_array(t.float().numpy(), target)
        raw = target not in (T.F16, T.F32)
        writer.add_tensor(name, data, raw_dtype=target if raw else None)
        counts[target.name] = counts.get(target.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def quantize_dit(src: Path, out: Path, qtype: T) -> dict[str, int]:
    """A DiT (any layout our loader reads) -> GGUF with our (NVlabs) names and its diffusers config."""
    from .checkpoints.dit import diffusers_config, load_dit
    from .checkpoints.gguf_files import CONFIG, SOURCE

    dit = load_dit(src)
    sd = dict(dit.state_dict())
    config = json.dumps(diffusers_config(dit.cfg))

    def metadata(writer) -> None:
        writer.add_string(CONFIG, config)
        writer.add_string(SOURCE, src.name)
        writer.add_string("general.name", f"Sana DiT {dit.variant}")

    return write_gguf(out, sd, qtype, DIT_QUANTIZED, "sana", metadata)


def quantize_gemma(src: Path, out: Path, qtype: T) -> dict[str, int]:
    """Gemma-2 (any file or folder the loader reads) -> GGUF in llama.cpp's Gemma-2 layout with its tokenizer."""
    from .checkpoints.gemma import gemma_to_llama_cpp, load_text_encoder, write_llama_cpp_metadata

    te = load_text_encoder(src, dtype=torch.float32)
    sd = gemma_to_llama_cpp(dict(te.model.state_dict()))
    pattern = re.compile(r"(blk\.\d+\.(attn_[qkv]|attn_output|ffn_(gate|up|down))|token_embd)\.weight")
    return write_gguf(out, sd, qtype, pattern, "gemma2",
                      lambda writer: write_llama_cpp_metadata(writer, te.model.config, te.tokenizer))


def detect_kind(path: Path) -> str:
    """"dit" or "gemma" from a file's or folder's keys."""
    from .checkpoints.files import locate, read_keys

    if path.is_dir():
        if (path / "text_encoder").is_dir() and not (path / "transformer").is_dir():
            return "gemma"
        if (path / "config.json").is_file() and json.loads((path / "config.json").read_text()).get(
                "model_type") == "gemma2":
            return "gemma"
        path, _ = locate(path, "transformer")
    keys = read_keys(path)
    return "gemma" if any("post_feedforward_layernorm" in k for k in keys) else "dit"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sana_core.quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="a Sana DiT or Gemma-2 file or folder (any layout we load)")
    parser.add_argument("output", type=Path, help="the .gguf file to write")
    parser.add_argument("--type", default="Q8_0", choices=TYPES, help="GGML type of the quantized matrices")
    parser.add_argument("--model", choices=("auto", "dit", "gemma"), default="auto",
                        help="what the input is (auto: from its keys)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.output.suffix.lower() != ".gguf":
        parser.error(f"output {args.output}: expected a .gguf file name")
    if not args.input.exists():
        parser.error(f"input {args.input}: no such file or folder")
    kind = detect_kind(args.input) if args.model == "auto" else args.model
    qtype = T[args.type]
    counts = (quantize_dit if kind == "dit" else quantize_gemma)(args.input, args.output, qtype)
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({kind}, {size / 2**20:.1f} MiB): " +
          ", ".join(f"{n} tensors {k}" for k, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
