"""Prompt encoding with Gemma-2-2B (positive with the complex human instruction + empty negative), ours vs
diffusers' SanaPipeline.encode_prompt on the same model in the same run.

    python bench/gemma.py --device cuda --dtype bf16
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import DTYPES, PROMPT, gemma, measure, parser, report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    from diffusers import SanaPipeline as Diffusers

    from sana_core import precision
    from sana_core.text_encoder import SanaTextEncoder

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model, tokenizer = gemma(device, precision.text_encoder_dtype(dtype, device), args.tiny)
    ours = SanaTextEncoder(model, tokenizer)
    theirs = Diffusers(tokenizer=tokenizer, text_encoder=model, vae=None, transformer=None, scheduler=None)

    def run_ours():
        ours.encode([PROMPT], use_chi=True)
        ours.encode([""], use_chi=False)

    with torch.no_grad():
        o = measure(run_ours, device, args.warmup, args.runs)
        d = measure(lambda: theirs.encode_prompt(PROMPT, do_classifier_free_guidance=True, device=device),
                    device, args.warmup, args.runs)
    report(f"Gemma-2 prompt encoding ({args.device}, {args.dtype})",
           [{"case": "positive (CHI) + empty negative", "ours": o, "diffusers": d}], args.json)


if __name__ == "__main__":
    main()
