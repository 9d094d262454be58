"""Shared benchmark machinery: real-size random models built once for both sides, timing, reporting.

Both sides get the same weights: our modules are filled with random values and diffusers' are loaded from
their state dicts (key conversion as in the checkpoint loaders); Gemma-2 is one shared transformers module.
Random weights have the real shapes, so timings and memory hold for the released checkpoints. The tokenizer
is the tiny one of `sana_core.tiny` (real Gemma's cannot be downloaded here): prompts tokenize into more
tokens than with Gemma's 256k vocabulary, the same for both sides. `--tiny` swaps every model for the tiny
test-size one and caps sizes at 512 px: a smoke test of the benchmark itself (its timings mean nothing).

Memory is reported as the peak *over what was allocated when the measurement began* (activations and
workspaces; both sides' weights are resident throughout): `torch.cuda.max_memory_allocated` on CUDA, the
kernel's resident-set high-water mark (reset through /proc/self/clear_refs) on the CPU. Whole-pipeline peaks
with only our models resident come from `bench/memory.py`.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sana_core.checkpoints.dcae import diffusers_config as dcae_diffusers_config
from sana_core.checkpoints.dit import diffusers_config, nvlabs_to_diffusers
from sana_core.dcae import DCAE, DCAEConfig
from sana_core.dcae import VARIANTS as DCAE_VARIANTS
from sana_core.dit import VARIANTS, DiTConfig, SanaDiT
from sana_core.precision import DTYPES
from sana_core.tiny import randomize_, tiny_dcae_config, tiny_dit_config

MODELS = {"0.6b": "sana-0.6b", "1.6b": "sana-1.6b", "sprint-0.6b": "sana-sprint-0.6b",
          "sprint-1.6b": "sana-sprint-1.6b"}
PROMPT = "a cyberpunk cat with a neon sign that says Sana, highly detailed, cinematic lighting"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), nargs="+", default=["0.6b"])
    p.add_argument("--size", type=int, nargs="+", default=[1024], help="image sizes in pixels (square)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny models: checks that the benchmark runs (no real times)")
    p.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   help="torch.compile our DiT (default, reduce-overhead...); give --warmup 3: CUDA graphs record late")
    p.add_argument("--json", help="also write the results here")
    return p


TINY_SIZE = 128  # px: the largest image of a --tiny run


def sizes(args: argparse.Namespace) -> list[int]:
    """The --size list; with --tiny capped at TINY_SIZE (the smoke test checks the code paths, not the sizes)."""
    return [min(s, TINY_SIZE) for s in args.size] if args.tiny else args.size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure(fn: Callable[[], object], device: torch.device, warmup: int, runs: int) -> dict:
    """Median wall time (CUDA events on GPU) over `runs` after `warmup`, and the peak memory in GiB over what
    was allocated before (see the module docstring)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current resident set
        base = _rss_kib("VmRSS") * 1024
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
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    return {"median_s": statistics.median(times), "runs_s": times, "peak_gib": max(peak - base, 0) / 2**30}


@dataclass
class Pair:
    ours: torch.nn.Module
    theirs: torch.nn.Module


def dit_config(model: str, tiny: bool = False) -> DiTConfig:
    cfg = VARIANTS[MODELS[model]]
    return tiny_dit_config(sprint=cfg.guidance_embed) if tiny else cfg


def dit_pair(model: str, device: torch.device, dtype: torch.dtype, tiny: bool = False) -> Pair:
    from diffusers import SanaTransformer2DModel

    cfg = dit_config(model, tiny)
    ours = randomize_(SanaDiT(cfg, dtype=dtype), seed=0).eval()
    dc = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        theirs = SanaTransformer2DModel(**dc)
    theirs.load_state_dict(nvlabs_to_diffusers(ours.state_dict()), assign=True)
    return Pair(ours.to(device), theirs.eval().to(device, dtype))


def dcae_config(tiny: bool = False) -> DCAEConfig:
    return tiny_dcae_config("dc-ae-f32c32-sana-1.1") if tiny else DCAE_VARIANTS["dc-ae-f32c32-sana-1.1"]


def dcae_pair(device: torch.device, dtype: torch.dtype, tiny: bool = False) -> Pair:
    from diffusers import AutoencoderDC

    cfg = dcae_config(tiny)
    ours = randomize_(DCAE(cfg), seed=1).eval().to(dtype)
    with torch.device("meta"):
        theirs = AutoencoderDC(**{k: v for k, v in dcae_diffusers_config(cfg).items() if not k.startswith("_")})
    theirs.load_state_dict(ours.state_dict(), assign=True)
    return Pair(ours.to(device, memory_format=torch.channels_last), theirs.eval().to(device, dtype))


TINY_GEMMA_HEAD_DIM = 32  # sana_core.tiny's Gemma keeps Gemma-2's 256 for the single-file loader, unused here;
# at 256 its eager bf16 attention over the ~1000 tokens of a CHI prompt took a third of the --tiny suite


@functools.cache
def _tiny_gemma_folder() -> Path:
    """The tiny Gemma folder (its tokenizer is every run's; its config the --tiny model's): one temporary folder
    per process, not one per model built."""
    from sana_core.tiny import write_tiny_gemma

    return write_tiny_gemma(Path(tempfile.mkdtemp()) / "gemma")


def gemma(device: torch.device, dtype: torch.dtype, tiny: bool = False):
    """(real-size random Gemma2Model, or the tiny one with head_dim TINY_GEMMA_HEAD_DIM; the tiny Gemma
    tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer, Gemma2Config, Gemma2Model

    from sana_core.checkpoints.gemma import GEMMA2_2B

    folder = _tiny_gemma_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tiny:
        config = AutoConfig.from_pretrained(folder)
        config.head_dim = TINY_GEMMA_HEAD_DIM
    else:
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
    print(f"{'case':<34}{'ours':>11}{'diffusers':>11}{'speed-up':>10}{'ours +GiB':>10}{'diff. +GiB':>11}")
    for r in rows:
        print(f"{r['case']:<34}{r['ours']['median_s'] * 1e3:>9.1f}ms{r['diffusers']['median_s'] * 1e3:>9.1f}ms"
              f"{r['diffusers']['median_s'] / r['ours']['median_s']:>9.2f}x"
              f"{r['ours']['peak_gib']:>10.2f}{r['diffusers']['peak_gib']:>11.2f}")
    if path:
        for r in rows:
            r["speedup"] = r["diffusers"]["median_s"] / r["ours"]["median_s"]
        Path(path).write_text(json.dumps({"title": title, "environment": environment(), "rows": rows}, indent=1))


def environment() -> dict:
    import platform

    import diffusers
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "gpu": gpu, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
