"""Where float16 is not enough: the one mechanism every model of the engine (and the ComfyUI nodes) uses when a
float16 pass overflows, and the dtype it widens to."""
from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch

log = logging.getLogger(__name__)


def fp16_fallback_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 (the size of float16 with float32's range), or float32 on a CUDA GPU without bfloat16."""
    device = torch.device(device)
    return torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float32


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
