"""How a DC-AE pass fits in memory: the activation estimate, overlapping tiles blended with linear ramps, the
automatic tile size and the out-of-memory policy (a whole pass that runs out of memory is retried in tiles, a
tiled one with tiles half as wide). The architecture is in `dcae.py`, which runs its encoder and decoder
through `run_pass`.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("sana_core.dcae")

MIN_TILE, MAX_TILE = 256, 2048  # automatic tile sizes in image pixels (bigger tiles gain little, use more memory)
Progress = Callable[[int, int], None]  # (blocks done, blocks in all): after every block of every tile


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


def run_pass(net: Callable[[torch.Tensor, Callable[[], None]], torch.Tensor], x: torch.Tensor, *, factor: int,
             decode: bool, blocks: int, estimate: Callable[[int], int], tiled: bool | None = None,
             tile_size: int | None = None, overlap: int | None = None, max_memory: int | None = None,
             progress: Progress | None = None) -> torch.Tensor:
    """`net(x, tick)` (an encoder on images (B, 3, H, W) or a decoder on latents (B, C, H/f, W/f), f = `factor`,
    calling `tick()` after each of its `blocks` blocks), whole or in overlapping tiles.

    estimate(pixels): peak activation bytes of a pass over the batch at `pixels` image pixels per image.
    tiled: None tiles when the whole pass would need more than `max_memory` bytes (default: the device's free
    memory) or runs out of memory; True/False forces. tile_size / overlap: image pixels, multiples of f (default:
    the largest tile of MIN_TILE..MAX_TILE that fits, sharing a quarter of it, at most 256 px). A tiled pass that
    runs out of memory is repeated with tiles half as wide. progress(done, total) after every block of every tile.
    """
    f = factor
    scale_in, scale_out = (1, f) if decode else (f, 1)  # pixels per latent pixel of the input and output
    counter = _Counter(progress, blocks)
    budget = free_memory(x.device) if max_memory is None else min(max_memory, free_memory(x.device))
    automatic = tile_size is None
    if automatic:  # the largest tile that fits
        tile_size = next((t for t in range(MAX_TILE, MIN_TILE, -f)
                          if estimate(t * t) <= budget), MIN_TILE)
    quarter = min(256, tile_size // 4) // f * f
    overlap = quarter if overlap is None else min(overlap, quarter) if automatic else overlap
    if tile_size % f or overlap % f or not 0 <= overlap < tile_size:
        raise ValueError(f"DC-AE tiling: tile_size {tile_size} and overlap {overlap} must be multiples of {f} "
                         "with 0 <= overlap < tile_size")

    def whole() -> torch.Tensor:
        counter.start(1)
        return net(x, counter.tick)

    if tiled is None:
        untiled = estimate(x.shape[-2] * x.shape[-1] * (f * f if decode else 1))
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
