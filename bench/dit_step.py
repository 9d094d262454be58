"""One DiT step with CFG (batch 2), ours vs diffusers in the same run, same weights and inputs.

    python bench/dit_step.py --model 0.6b 1.6b --size 512 1024 2048 4096 --device cuda --dtype bf16
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import DTYPES, dit_pair, measure, parser, report, sizes  # noqa: E402


def bench_model(model: str, args) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    pair = dit_pair(model, device, dtype, args.tiny)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 300, pair.ours.cfg.caption_channels, generator=g).to(device, dtype)
    mask = torch.zeros(2, 300, dtype=torch.int64, device=device)
    mask[0, :1], mask[1, :60] = 1, 1  # an empty negative prompt and a 60-token prompt
    t, extra = torch.tensor([500.0, 500.0], device=device), {}
    if pair.ours.cfg.guidance_embed:  # Sprint: the guidance (scale 4.5 x 0.1) is an input of the model
        t, extra = t / 1000, {"guidance": torch.tensor([0.45, 0.45], device=device)}
    ours = pair.ours
    if args.compile:
        compiled = torch.compile(ours, dynamic=False, mode=None if args.compile == "default" else args.compile)

        def ours(*a, **kw):  # a new CUDA-graph step per call, as the pipeline marks them
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*a, **kw)
    rows = []
    for size in sizes(args):
        x = torch.randn(2, 32, size // 32, size // 32, generator=g).to(device, dtype)
        with torch.no_grad():
            kv = pair.ours.text_kv(context, mask)  # as the sampler does: once per generation
            o = measure(lambda: ours(x, t, None, mask, text_kv=kv, **extra), device,
                        args.warmup, args.runs)
            d = measure(lambda: pair.theirs(x, encoder_hidden_states=context, timestep=t,
                                            encoder_attention_mask=mask, **extra), device, args.warmup, args.runs)
        compiled = f" (ours compiled: {args.compile})" if args.compile else ""
        rows.append({"case": f"{model} {size}px batch 2{compiled}", "ours": o, "diffusers": d})
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    rows = [row for model in args.model for row in bench_model(model, args)]
    report(f"DiT step ({args.device}, {args.dtype})", rows, args.json)


if __name__ == "__main__":
    main()
