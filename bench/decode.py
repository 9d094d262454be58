"""DC-AE decode, ours vs diffusers in the same run (diffusers untiled, and tiled when --tiled is given).

    python bench/decode.py --size 1024 2048 4096 --device cuda --dtype bf16 --tiled
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import DTYPES, dcae_pair, measure, parser, report  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tiled", action="store_true", help="compare tiled decodes (ours: automatic choice off, tiles on)")
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    pair = dcae_pair(device, dtype)
    if args.tiled:
        pair.theirs.enable_tiling()
    rows = []
    for size in args.size:
        z = torch.randn(1, 32, size // 32, size // 32, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        with torch.no_grad():
            o = measure(lambda: pair.ours.decode(z, tiled=args.tiled or None), device, args.warmup, args.runs)
            d = measure(lambda: pair.theirs.decode(z).sample, device, args.warmup, args.runs)
        rows.append({"case": f"decode {size}px{' tiled' if args.tiled else ''}", "ours": o, "diffusers": d})
    report(f"DC-AE decode ({args.device}, {args.dtype})", rows, args.json)


if __name__ == "__main__":
    main()
