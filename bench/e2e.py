"""End to end, ours vs diffusers in the same run: text encode + 20 steps with CFG 4.5 + DC-AE decode.

    python bench/e2e.py --model 0.6b --size 512 --device cpu --dtype bf16 --runs 2
    python bench/e2e.py --model 0.6b 1.6b --size 1024 --device cuda          (the GPU targets)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import DTYPES, PROMPT, dcae_pair, dit_pair, gemma, measure, parser, report  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    from diffusers import DPMSolverMultistepScheduler
    from diffusers import SanaPipeline as Diffusers

    from sana_core.pipeline import SanaPipeline
    from sana_core.text_encoder import SanaTextEncoder

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    te_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    text_model, tokenizer = gemma(device, te_dtype)
    dit, vae = dit_pair(args.model, device, dtype), dcae_pair(device, dtype)
    ours = SanaPipeline(dit.ours, vae.ours, SanaTextEncoder(text_model, tokenizer), device=device)
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    theirs = Diffusers(tokenizer=tokenizer, text_encoder=text_model, vae=vae.theirs, transformer=dit.theirs,
                       scheduler=scheduler)
    theirs.set_progress_bar_config(disable=True)
    rows = []
    for size in args.size:
        common = dict(height=size, width=size, num_inference_steps=args.steps, guidance_scale=4.5)
        with torch.no_grad():
            o = measure(lambda: ours(PROMPT, seed=0, output_type="pt", progress=False, **common), device,
                        args.warmup, args.runs)
            d = measure(lambda: theirs(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                                       use_resolution_binning=False, **common), device, args.warmup, args.runs)
        rows.append({"case": f"{args.model} {size}px {args.steps} steps CFG", "ours": o, "diffusers": d})
    report(f"end to end ({args.device}, {args.dtype})", rows, args.json)


if __name__ == "__main__":
    main()
