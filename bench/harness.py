"""Shared benchmark machinery: real-size random models built once for both sides, timing, reporting.

Both sides get the same weights: our modules are filled with random values and diffusers' are loaded from
their state dicts (key conversion as in the checkpoint loaders); Gemma-2 is one shared transformers module.
Random weights have the real shapes, so timings and memory hold for the released checkpoints. The tokenizer
is the tiny one of `sana_core.tiny` (real Gemma's cannot be downloaded here): prompts tokenize into more
tokens than with Gemma's 256k vocabulary, the same for both sides.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sana_core.checkpoints.dit import diffusers_config, nvlabs_to_diffusers
from sana_core.dcae import DCAE
from sana_core.dcae import VARIANTS as DCAE_VARIANTS
from sana_core.dit import VARIANTS, SanaDiT
from sana_core.tiny import randomize_

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODELS = {"0.6b": "sana-0.6b", "1.6b": "sana-1.6b", "sprint-0.6b": "sana-sprint-0.6b"}
PROMPT = "a cyberpunk cat with a neon sign that says Sana, highly detailed, cinematic lighting"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", choices=list(MODELS), default="0.6b")
    p.add_argument("--size", type=int, nargs="+", default=[1024], help="image sizes in pixels (square)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, warmup: int, runs: int) -> dict:
    """Median wall time (CUDA events on GPU) over `runs` after `warmup`, and peak memory in GiB."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(runs):
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            sync(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # the process's high-water mark (both sides together): an upper bound
        peak = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20
    return {"median_s": statistics.median(times), "runs_s": times, "peak_gib": peak}


@dataclass
class Pair:
    ours: torch.nn.Module
    theirs: torch.nn.Module


def dit_pair(model: str, device: torch.device, dtype: torch.dtype) -> Pair:
    from diffusers import SanaTransformer2DModel

    cfg = VARIANTS[MODELS[model]]
    ours = randomize_(SanaDiT(cfg, dtype=dtype), seed=0).eval()
    dc = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        theirs = SanaTransformer2DModel(**dc)
    theirs.load_state_dict(nvlabs_to_diffusers(ours.state_dict()), assign=True)
    return Pair(ours.to(device), theirs.eval().to(device, dtype))


def dcae_pair(device: torch.device, dtype: torch.dtype) -> Pair:
    from diffusers import AutoencoderDC

    cfg = DCAE_VARIANTS["dc-ae-f32c32-sana-1.1"]
    ours = randomize_(DCAE(cfg), seed=1).eval().to(dtype)
    with torch.device("meta"):
        theirs = AutoencoderDC(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")})
    theirs.load_state_dict(ours.state_dict(), assign=True)
    return Pair(ours.to(device, memory_format=torch.channels_last), theirs.eval().to(device, dtype))


def gemma(device: torch.device, dtype: torch.dtype):
    """(real-size random Gemma2Model, tiny Gemma tokenizer)."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

    from sana_core.checkpoints.gemma import GEMMA2_2B
    from sana_core.tiny import write_tiny_gemma

    folder = write_tiny_gemma(Path(tempfile.mkdtemp()) / "gemma")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = Gemma2Config(**GEMMA2_2B)
    config._attn_implementation = "eager"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype != torch.float16 else torch.bfloat16)
    try:
        with torch.device(device):
            model = Gemma2Model(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    return model, tokenizer


def report(title: str, rows: list[dict], path: str | None) -> None:
    """Print a table (ours, diffusers, speed-up, peak memory) and optionally write JSON."""
    print(f"\n{title}")
    print(f"{'case':<34}{'ours':>11}{'diffusers':>11}{'speed-up':>10}{'ours GiB':>10}{'diff. GiB':>10}")
    for r in rows:
        print(f"{r['case']:<34}{r['ours']['median_s'] * 1e3:>9.1f}ms{r['diffusers']['median_s'] * 1e3:>9.1f}ms"
              f"{r['diffusers']['median_s'] / r['ours']['median_s']:>9.2f}x"
              f"{r['ours']['peak_gib']:>10.2f}{r['diffusers']['peak_gib']:>10.2f}")
    if path:
        Path(path).write_text(json.dumps({"title": title, "rows": rows}, indent=1))
