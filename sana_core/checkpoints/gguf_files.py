"""Reading GGUF files (the llama.cpp format, through the `gguf` package): tensors and metadata.

Quantized tensors come out as `quantized.QuantizedTensor` (they stay quantized in memory); F32/F16/BF16 ones as
ordinary tensors, cast to the dtype asked. Tensor names are the file's: our DiT files hold NVlabs or diffusers
names (`checkpoints.dit` detects them), llama.cpp's Gemma-2 files their own (`checkpoints.gemma` maps them).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..quantized import FLOAT_TYPES, SUPPORTED, QuantizedTensor, T, raw_shape
from .common import CheckpointError, Keep, PathLike

log = logging.getLogger(__name__)

#: Metadata keys our quantize command writes.
ARCH, CONFIG, SOURCE = "general.architecture", "sana.config", "sana.source"


def _reader(path: PathLike):
    import gguf

    try:  # copy-on-write map: tensors are file pages until written (like safetensors' memory map)
        return gguf.GGUFReader(str(path), mode="c")
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read this GGUF file ({type(e).__name__}: {e}); it may be truncated "
                              "or corrupt") from e


def read_gguf(path: PathLike, dtype: torch.dtype | None = None, keep: Keep = None) -> dict[str, torch.Tensor]:
    """The tensors of a GGUF file (those `keep(name)` accepts), on the file's copy-on-write memory map (read when
    used; `.to(device)` copies them, float ones cast to `dtype` are copied).

    Quantized types in `quantized.QUANTIZED` stay quantized; float ones are cast to `dtype` (None keeps them).
    Other types (I8..., IQ*, TQ*) raise CheckpointError naming the tensor and its type.
    """
    reader = _reader(path)
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if keep is not None and not keep(t.name):
            continue
        qtype = T(int(t.tensor_type))
        if qtype not in SUPPORTED:
            raise CheckpointError(f"{path}: tensor {t.name!r} is stored as {qtype.name}, which is not supported; "
                                  f"supported GGML types: {', '.join(x.name for x in SUPPORTED)}")
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        data = torch.from_numpy(t.data)
        if qtype in FLOAT_TYPES:
            tensor = data.view(FLOAT_TYPES[qtype]).reshape(shape)
            out[t.name] = tensor if dtype is None else tensor.to(dtype)
        else:
            out[t.name] = QuantizedTensor(data.reshape(raw_shape(shape, qtype)), qtype, shape)
    return out


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The metadata key/values of a GGUF file (strings, numbers, arrays), without its tensors."""
    reader = _reader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def sana_config(path: PathLike) -> dict | None:
    """The diffusers transformer config our quantize command stores in a DiT GGUF (None when absent)."""
    meta = read_metadata(path)
    text = meta.get(CONFIG)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: metadata {CONFIG!r} is not valid JSON ({e})") from e


def is_gguf(path: PathLike) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def tensor_names(path: PathLike) -> list[str]:
    """The tensor names of a GGUF file, without reading the tensors."""
    return [t.name for t in _reader(path).tensors]
