"""DC-AE decode, ours vs diffusers in the same run: both untiled, or with --tiled both tiled (ours: tiles of
--tile-size px, by default the largest that fits the memory; diffusers: `enable_tiling()`, 512 px tiles).

    python bench/decode.py --size 1024 2048 4096 --device cuda --dtype bf16
    python bench/decode.py --size 4096 --device cuda --dtype bf16 --tiled
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import DTYPES, dcae_pair, measure, parser, report, sizes  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--tiled", action="store_true", help="compare tiled decodes")
    p.add_argument("--tile-size", type=int, help="our tile size in pixels (default: the largest that fits)")
    p.add_argument("--max-memory", type=float, help="GiB our decode may use (default: the free memory)")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    pair = dcae_pair(device, dtype, args.tiny)
    if args.tiled:
        pair.theirs.enable_tiling()
    budget = int(args.max_memory * 2**30) if args.max_memory else None
    rows = []
    for size in sizes(args):
        z = torch.randn(1, 32, size // 32, size // 32, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        with torch.no_grad():
            o = measure(lambda: pair.ours.decode(z, tiled=args.tiled or None, tile_size=args.tile_size,
                                                 max_memory=budget), device, args.warmup, args.runs)
            d = measure(lambda: pair.theirs.decode(z).sample, device, args.warmup, args.runs)
        rows.append({"case": f"decode {size}px{' tiled' if args.tiled else ''}", "ours": o, "diffusers": d})
    report(f"DC-AE decode ({args.device}, {args.dtype})", rows, args.json)


if __name__ == "__main__":
    main()
