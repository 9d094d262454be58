"""Peak bytes of live tensors while code runs, on any device (the CPU included), as CUDA's
`max_memory_allocated` counts them: every tensor an op returns is counted once per storage from its creation
until it is freed. Kernels' internal scratch buffers are not seen.

    with PeakTensors(existing=model.parameters()) as peak:
        model(x)
    print(peak.peak)   # bytes of tensors made while it ran (views of `existing` ones do not count)
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensors(TorchDispatchMode):
    def __init__(self, existing=()):
        super().__init__()
        self.live, self.peak = 0, 0
        self._seen = {(t.untyped_storage().data_ptr(), t.device) for t in existing}  # never counted

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: tuple, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
