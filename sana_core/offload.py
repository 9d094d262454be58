"""Block offload: a DiT larger than the GPU runs with its transformer blocks kept on the CPU (pinned memory on
CUDA) and each block streamed to the device in time for its turn; the small rest of the model (embedders, final
layer) stays on the device.

Before block i computes, block i+1..i+`ahead` are copied on a side stream (CUDA), so the copies overlap the
compute; block i waits for its own copy's event; after it computes, its device copy is dropped (the allocator
reuses the memory only once the compute stream is past it: `record_stream`). After the last block, the first
ones are fetched for the next step. `Transfers` is the device side (CUDA streams, or synchronous copies), so
the order and the bookkeeping are tested on the CPU with a recording fake.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class Transfers:
    """Synchronous copies (CPU, MPS, or a CUDA device without streams): events are None."""

    def __init__(self, device: torch.device):
        self.device = device

    def copy(self, tensors: Sequence[torch.Tensor], block: int) -> tuple[list[torch.Tensor], Any]:
        """Device copies of `tensors` (block `block`'s), and an event the compute waits for before using them."""
        return [t.to(self.device) for t in tensors], None

    def wait(self, event: Any, block: int) -> None:
        """Make the compute wait for a copy's event."""

    def computed(self, block: int) -> None:
        """Block `block` has been queued on the compute stream (its inputs may be released after it)."""


class CudaTransfers(Transfers):
    """Copies on a side CUDA stream from pinned memory; events order them with the compute stream."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.stream = torch.cuda.Stream(device)
        self.compute = torch.cuda.current_stream(device)

    def copy(self, tensors: Sequence[torch.Tensor], block: int) -> tuple[list[torch.Tensor], Any]:
        self.stream.wait_stream(self.compute)  # the memory it writes may have been freed by the compute stream
        with torch.cuda.stream(self.stream):
            out = [t.to(self.device, non_blocking=True) for t in tensors]
            event = torch.cuda.Event()
            event.record(self.stream)
        for t in out:
            t.record_stream(self.compute)  # not reused before the compute that reads it is done
        return out, event

    def wait(self, event: Any, block: int) -> None:
        self.compute.wait_event(event)


class BlockOffload:
    """Streams `blocks` (modules run in order, each once per model call) between the CPU and `device`.

    `attach()` moves each block's parameters to CPU memory (pinned with `CudaTransfers`) and hooks the blocks;
    `detach()` removes the hooks and leaves the blocks on the CPU. At most `ahead + 1` blocks are on the device
    at once.
    """

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device | str, transfers: Transfers | None = None,
                 ahead: int = 1):
        self.blocks, self.device, self.ahead = list(blocks), torch.device(device), max(1, ahead)
        if transfers is None:
            cuda = self.device.type == "cuda" and torch.cuda.is_available()
            transfers = CudaTransfers(self.device) if cuda else Transfers(self.device)
        self.transfers = transfers
        self.params = [[p for _, p in b.named_parameters()] for b in self.blocks]
        self.host: list[list[torch.Tensor]] = []
        self.pending: dict[int, Any] = {}   # block -> event of its copy in flight or done, while on the device
        self.hooks: list[Any] = []

    @property
    def resident(self) -> list[int]:
        """The blocks whose device copy exists (in flight or in use)."""
        return sorted(self.pending)

    def attach(self) -> BlockOffload:
        pin = isinstance(self.transfers, CudaTransfers)
        self.host = []
        for params in self.params:
            host = [p.data.to("cpu") for p in params]
            host = [t.pin_memory() if pin else t for t in host]
            for p, t in zip(params, host):
                p.data = t
            self.host.append(host)
        for i, block in enumerate(self.blocks):
            self.hooks.append(block.register_forward_pre_hook(lambda m, args, i=i: self.enter(i)))
            self.hooks.append(block.register_forward_hook(lambda m, args, out, i=i: self.exit(i)))
        return self

    def wrap(self, i: int, fn: Any) -> Any:
        """`fn` (a method of block i called outside its forward, e.g. its text keys/values) with block i streamed
        in around it."""
        def streamed(*args: Any, **kwargs: Any) -> Any:
            self.enter(i)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit(i)
        return streamed

    def detach(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for i in list(self.pending):
            self._evict(i)

    def _fetch(self, i: int) -> None:
        if i in self.pending:
            return
        copies, event = self.transfers.copy(self.host[i], i)
        for p, t in zip(self.params[i], copies):
            p.data = t
        self.pending[i] = event

    def _evict(self, i: int) -> None:
        for p, t in zip(self.params[i], self.host[i]):
            p.data = t
        self.pending.pop(i, None)

    def enter(self, i: int) -> None:
        """Block i is about to compute: its copy is waited for, the next `ahead` blocks' copies are started."""
        self._fetch(i)
        self.transfers.wait(self.pending[i], i)
        n = len(self.blocks)
        for k in range(1, min(self.ahead, n - 1) + 1):  # the next ones, wrapping to the next call's first
            self._fetch((i + k) % n)

    def exit(self, i: int) -> None:
        """Block i has been queued: its device copy is dropped (unless every block fits the window)."""
        self.transfers.computed(i)
        if len(self.blocks) > self.ahead + 1:
            self._evict(i)


def offload_blocks(dit: nn.Module, device: torch.device | str, ahead: int = 1,
                   transfers: Transfers | None = None) -> BlockOffload:
    """Put a Sana DiT (or ControlNet) on `device` but its `blocks`, which are streamed (see `BlockOffload`)."""
    for name, child in dit.named_children():
        if name != "blocks":
            child.to(device)
    for name, p in dit.named_parameters(recurse=False):
        p.data = p.data.to(device)
    offload = BlockOffload(dit.blocks, device, transfers, ahead).attach()
    for i, block in enumerate(dit.blocks):  # the text keys/values are computed outside the blocks' forward
        block.cross_attn.kv = offload.wrap(i, block.cross_attn.kv)
    return offload


def remove_offload(dit: nn.Module, offload: BlockOffload) -> None:
    """Undo `offload_blocks`: hooks and wrappers removed, the blocks left on the CPU."""
    offload.detach()
    for block in dit.blocks:
        block.cross_attn.__dict__.pop("kv", None)
