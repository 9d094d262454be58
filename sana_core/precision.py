"""Where float16 is not enough: the one mechanism every model of the engine (and the ComfyUI nodes) uses when a
float16 pass overflows, and the dtype it widens to."""
from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch

log = logging.getLogger(__name__)


#: The dtype names of the CLI, the trainer, the benchmarks and the nodes' dtype options.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_device(device: torch.device | str | None = None) -> torch.device:
    """`device`, or by default the CUDA GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype to compute in when none is asked for: bfloat16 on a CUDA GPU that has it, float32 elsewhere
    (CPUs compute bfloat16 slowly)."""
    device = torch.device(device)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def fp16_fallback_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 (the size of float16 with float32's range), or float32 on a CUDA GPU without bfloat16."""
    device = torch.device(device)
    return torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float32


def text_encoder_dtype(dtype: torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The dtype Gemma-2 runs in on `device` for the dtype asked (None: `default_dtype`): bfloat16 or float32.

    float16 overflows in Gemma-2, so it is replaced (with a warning) by `fp16_fallback_dtype`."""
    if dtype is None:
        return default_dtype(device)
    if dtype == torch.float16:
        wider = fp16_fallback_dtype(device)
        log.warning("Gemma-2 overflows in float16; running the text encoder in %s instead", wider)
        return wider
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"text encoder dtype {dtype} is not supported; use torch.bfloat16 or torch.float32")
    return dtype


class Widenable(Protocol):
    """A model that computes in `compute_dtype` and can be made to compute in a wider one (`widen`): the
    engine's models convert their weights; ComfyUI's DiT keeps them and casts layer by layer."""

    compute_dtype: torch.dtype

    def widen(self, dtype: torch.dtype) -> None: ...


class Widened:
    """Several models that compute together (a DiT and its ControlNets) seen as one `Widenable`: the first's
    compute dtype, all widened at once."""

    def __init__(self, *models: Widenable):
        self.models = models

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.models[0].compute_dtype

    def widen(self, dtype: torch.dtype) -> None:
        for model in self.models:
            model.widen(dtype)


def all_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def run_finite(run: Callable[[], torch.Tensor], model: Widenable, what: str) -> torch.Tensor:
    """`run()`, checked for inf/NaN. If a model computing in float16 overflowed, it is widened (bfloat16, or
    float32 on a GPU without it) with a warning, stays so for the rest of its life, and `run()` is repeated;
    inf/NaN in any other dtype (or again after widening) is a FloatingPointError naming `what` and the dtype."""
    out = run()
    if all_finite(out):
        return out
    dtype = model.compute_dtype
    if dtype == torch.float16:
        wider = fp16_fallback_dtype(out.device)
        log.warning("%s overflowed in float16 (inf/NaN); computing in %s from now on", what, wider)
        model.widen(wider)
        out = run()
        if all_finite(out):
            return out
        dtype = wider
    raise FloatingPointError(f"{what} produced inf/NaN computing in {dtype}: check the checkpoint, the LoRA "
                             "strengths and the inputs")
