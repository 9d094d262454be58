"""Peak memory of training steps, measured (not asserted): `python bench/train_memory.py`.

Each case runs in a fresh process: a real-size DiT (random weights, fp32 master weights), `--steps` optimizer steps
on one 300-token caption and a batch of latents at `--size` px, LoRA (AdamW, rank 4 on the attention projections)
or full (CAME), with or without gradient checkpointing. Reports the process's peak resident memory on the CPU
(`ru_maxrss`) or CUDA's `max_memory_allocated`, and the parameter bytes for reference.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sana_core.dit import VARIANTS, SanaDiT  # noqa: E402
from sana_core.train.lora import add_lora  # noqa: E402
from sana_core.train.recipe import flow_loss  # noqa: E402


def measure(variant: str, mode: str, size: int, batch: int, steps: int, checkpointing: bool, device: str) -> dict:
    """One case in this process; returns its numbers."""
    from sana_core.train.trainer import checkpoint_blocks

    cfg = VARIANTS[variant]
    dit = SanaDiT(cfg, device=device)
    for p in dit.parameters():  # no NaNs from uninitialised memory
        torch.nn.init.normal_(p, std=0.02)
    if mode == "lora":
        add_lora(dit, 4)
        opt = torch.optim.AdamW([p for p in dit.parameters() if p.requires_grad], lr=1e-4)
    else:
        from came_pytorch import CAME

        opt = CAME(dit.parameters(), lr=1e-4, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
    if checkpointing:
        checkpoint_blocks(dit)
    h = size // 32
    x0 = torch.randn(batch, 32, h, h, device=device)
    ctx, mask = torch.randn(batch, 300, cfg.caption_channels, device=device), torch.ones(batch, 300, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        loss = flow_loss(dit, x0, torch.randn_like(x0), torch.full((batch,), 0.5, device=device), ctx, mask).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - started) / steps
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    params = sum(p.numel() * p.element_size() for p in dit.parameters())
    return {"variant": variant, "mode": mode, "size": size, "batch": batch, "checkpointing": checkpointing,
            "device": device, "peak_GiB": round(peak / 2**30, 2), "params_GiB": round(params / 2**30, 2),
            "seconds_per_step": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/train_memory.py", description=__doc__)
    p.add_argument("--variant", default="sana-0.6b", choices=list(VARIANTS))
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    p.add_argument("--device", default="cpu")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(measure(args.variant, args.case, args.size, args.batch, args.steps, args.checkpointing,
                                 args.device)))
        return 0
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--case", mode, "--variant", args.variant,
               "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps), "--device",
               args.device] + (["--checkpointing"] if args.checkpointing else [])
        print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
