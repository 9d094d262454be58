"""The DiT's activation memory: `sana_core.dit.activation_bytes` (what ComfyUI reserves for a forward) against
the measured peak of live tensors (`peak.py`, CUDA's max_memory_allocated count) of one forward with a full
300-token caption, for real Sana widths. Activations do not grow with depth but for the text keys/values, so
blocks are cut to `--depth` to keep big sizes measurable on a CPU.

    python bench/dit_memory.py --model 0.6b 1.6b --size 512 1024 2048 4096 --batch 1 2 4 --dtype fp32
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peak import PeakTensors  # noqa: E402

from sana_core.dit import VARIANTS, SanaDiT, activation_bytes  # noqa: E402
from sana_core.precision import DTYPES  # noqa: E402

MODELS = {"0.6b": "sana-0.6b", "1.6b": "sana-1.6b"}


def measure(cfg, px: int, batch: int, dtype: torch.dtype, device: str) -> int:
    model = SanaDiT(cfg, dtype=dtype, device=device)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    h = px // 32
    x = torch.randn(batch, 32, h, h, device=device, dtype=dtype)
    context = torch.randn(batch, 300, cfg.caption_channels, device=device, dtype=dtype)
    mask = torch.ones(batch, 300, dtype=torch.long, device=device)
    with torch.no_grad(), PeakTensors(existing=model.parameters()) as peak:
        model(x, torch.full((batch,), 500.0, device=device), context, mask)
    return peak.peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", choices=list(MODELS), default=["0.6b", "1.6b"])
    p.add_argument("--size", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32"])
    p.add_argument("--depth", type=int, default=2, help="blocks built (the estimate is for the same depth)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    rows = []
    print("| model | dtype | px | batch | measured MiB | estimate MiB | estimate / measured |")
    print("|---|---|---|---|---|---|---|")
    for name in args.model:
        cfg = replace(VARIANTS[MODELS[name]], depth=args.depth)
        for dtype in args.dtype:
            for px in args.size:
                for batch in args.batch:
                    started = time.perf_counter()
                    got = measure(cfg, px, batch, DTYPES[dtype], args.device)
                    want = activation_bytes(cfg, batch, (px // 32) ** 2, DTYPES[dtype])
                    rows.append(dict(model=name, dtype=dtype, px=px, batch=batch, measured=got, estimate=want,
                                     seconds=time.perf_counter() - started))
                    print(f"| {name} | {dtype} | {px} | {batch} | {got / 2**20:.1f} | {want / 2**20:.1f} | "
                          f"{want / got:.3f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
