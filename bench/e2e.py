"""End to end, ours vs diffusers in the same run: text encode + sampling + DC-AE decode, one image.

Sana models: 20 steps of DPM-Solver++ with CFG 4.5 (diffusers' SanaPipeline); Sprint models: 1 step of SCM
(SanaSprintPipeline), `--steps` to change either.

    python bench/e2e.py --model 0.6b --size 512 --device cpu --dtype bf16 --runs 2
    python bench/e2e.py --model 0.6b 1.6b sprint-0.6b --size 1024 --device cuda      (the GPU targets)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import DTYPES, PROMPT, dcae_pair, dit_pair, gemma, measure, parser, report, sizes  # noqa: E402


def bench_model(model: str, args, text_encoder: tuple, vae) -> list[dict]:
    from diffusers import DPMSolverMultistepScheduler, SCMScheduler
    from diffusers import SanaPipeline as Diffusers
    from diffusers import SanaSprintPipeline as DiffusersSprint

    from sana_core.pipeline import SanaPipeline
    from sana_core.text_encoder import SanaTextEncoder

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    (text_model, tokenizer), dit = text_encoder, dit_pair(model, device, dtype, args.tiny)
    ours = SanaPipeline(dit.ours, vae.ours, SanaTextEncoder(text_model, tokenizer), device=device,
                        compile=args.compile or False)
    parts = dict(tokenizer=tokenizer, text_encoder=text_model, vae=vae.theirs, transformer=dit.theirs)
    if dit.ours.cfg.guidance_embed:
        steps = args.steps or 1
        theirs = DiffusersSprint(**parts, scheduler=SCMScheduler())
        extra = {"intermediate_timesteps": None} if steps != 2 else {}
        name = f"{model} {{size}}px {steps} step{'s' * (steps > 1)}"
    else:
        steps = args.steps or 20
        theirs = Diffusers(**parts, scheduler=DPMSolverMultistepScheduler(
            flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"))
        extra, name = {}, f"{model} {{size}}px {steps} steps CFG"
    theirs.set_progress_bar_config(disable=True)
    rows = []
    for size in sizes(args):
        common = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=4.5)
        with torch.no_grad():
            o = measure(lambda: ours(PROMPT, seed=0, output_type="pt", progress=False, **common), device,
                        args.warmup, args.runs)
            d = measure(lambda: theirs(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                                       use_resolution_binning=False, **extra, **common), device, args.warmup, args.runs)
        compiled = f" (ours compiled: {args.compile})" if args.compile else ""
        rows.append({"case": name.format(size=size) + compiled, "ours": o, "diffusers": d})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, help="default: 20 (Sana), 1 (Sprint)")
    args = p.parse_args(argv)
    from sana_core import precision

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    text_encoder = gemma(device, precision.text_encoder_dtype(dtype, device), args.tiny)
    vae = dcae_pair(device, dtype, args.tiny)
    rows = [row for model in args.model for row in bench_model(model, args, text_encoder, vae)]
    report(f"end to end ({args.device}, {args.dtype})", rows, args.json)


if __name__ == "__main__":
    main()
