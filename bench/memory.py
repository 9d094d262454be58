"""Peak memory of whole generations with only our models resident (text encode + sampling + decode), each case
in a fresh process; with --offload the models wait on the CPU until their turn and the decode is capped.

    python bench/memory.py --model 0.6b 1.6b --size 1024 --offload --device cuda      (budgets 6 / 8 GiB)
    python bench/memory.py --model 1.6b --size 4096 --offload --device cuda           (budget 12 GiB)

Reports the peak of `torch.cuda.max_memory_allocated` (and of the reserved pool, closer to what nvidia-smi
shows) on CUDA, the resident-set high-water mark on the CPU (everything, Python included). Diffusers is
not run here: these are the budgets of the issue, not a comparison.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import DTYPES, PROMPT, _rss_kib, dcae_config, dit_config, environment, gemma, parser, sizes  # noqa: E402


def child(model: str, size: int, args) -> dict:
    """One generation in this process; returns the peak memory and the time it took."""
    from sana_core import precision
    from sana_core.dcae import DCAE
    from sana_core.dit import SanaDiT
    from sana_core.pipeline import SanaPipeline
    from sana_core.text_encoder import SanaTextEncoder
    from sana_core.tiny import randomize_

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    te_dtype = precision.text_encoder_dtype(dtype, device)
    text_model, tokenizer = gemma(torch.device("cpu"), te_dtype, args.tiny)  # the pipeline places the models
    dit = randomize_(SanaDiT(dit_config(model, args.tiny), dtype=dtype), seed=0).eval()
    vae = randomize_(DCAE(dcae_config(args.tiny), encoder=False), seed=1).eval()
    vae = vae.to(dtype, memory_format=torch.channels_last)
    pipe = SanaPipeline(dit, vae, SanaTextEncoder(text_model, tokenizer), device=device, offload=args.offload)
    steps = args.steps or (1 if dit.cfg.guidance_embed else 20)
    t0 = time.perf_counter()
    pipe(PROMPT, seed=0, height=size, width=size, num_inference_steps=steps, output_type="pt", progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = {"peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    else:
        peak = {"peak_gib": _rss_kib("VmHWM") / 2**20}
    return {"case": f"{model} {size}px {steps} step{'s' * (steps > 1)}{' offload' if args.offload else ''}",
            "seconds": time.perf_counter() - t0, **peak}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, help="default: 20 (Sana), 1 (Sprint); memory does not depend on it")
    p.add_argument("--offload", action="store_true", help="SanaPipeline(offload=True)")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args)))
        return
    rows = []
    passed = ["--device", args.device, "--dtype", args.dtype, *["--tiny"] * args.tiny, *["--offload"] * args.offload,
              *(["--steps", str(args.steps)] if args.steps else [])]
    for model in args.model:
        for size in sizes(args):
            out = subprocess.run([sys.executable, __file__, *passed, "--child", model, str(size)],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{model} {size}px failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\npeak memory, our pipeline alone ({args.device}, {args.dtype})")
    print(f"{'case':<40}{'peak GiB':>10}{'reserved':>10}{'time':>9}")
    for r in rows:
        print(f"{r['case']:<40}{r['peak_gib']:>10.2f}{r.get('reserved_gib', float('nan')):>10.2f}{r['seconds']:>8.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"title": "peak memory", "environment": environment(), "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
