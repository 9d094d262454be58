"""Caption cross-attention, the two candidate paths for one operation, timed in the same run (issue 17 §2):

- **grouped** (ours, `sana_core.dit.caption_kv`): each distinct caption projected once on its real tokens, the
  batch's rows grouped by caption length, one attention call per group;
- **dense**: every caption padded to the batch's longest (or to the full 300 tokens: diffusers, NVlabs) and
  attended with the padding mask as an additive bias, one attention call for the batch.

Per case: the text keys/values of every block (once per generation) and one cross-attention call of one block
(every step, every block), at the real widths with random weights.

    python bench/caption_attention.py --model 0.6b 1.6b --size 1024 --device cuda --dtype bf16
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import DTYPES, dit_config, measure, parser, sizes  # noqa: E402

from sana_core.dit import CrossAttention, caption_kv  # noqa: E402
from sana_core.tiny import randomize_  # noqa: E402

# (name, real tokens per caption of the batch): CFG with an empty negative, a batch of 4 prompts with CFG
CASES = [("CFG, 1 prompt", [60, 1]), ("CFG, 4 prompts", [60, 20, 120, 40, 1, 1, 1, 1])]


def dense_kv(attn: CrossAttention, embed, context: torch.Tensor, mask: torch.Tensor):
    """The padded candidate: keys/values of all T rows and the bias (B, 1, 1, T)."""
    bias = ((1 - mask.to(context.dtype)) * -10000.0)[:, None, None, :]
    return attn.kv(embed(context)), bias


def dense_attention(attn: CrossAttention, x: torch.Tensor, kv, bias: torch.Tensor) -> torch.Tensor:
    B, N, C = x.shape
    q = attn.q_linear(x).reshape(B, N, attn.heads, C // attn.heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, *kv, attn_mask=bias)
    return attn.proj(out.transpose(1, 2).reshape(B, N, C))


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"caption cross-attention ({args.device}, {args.dtype}): grouped (ours) vs dense + bias, one block")
    print(f"{'case':<40}{'grouped':>11}{'dense@max':>11}{'dense@300':>11}   text K/V per run: grouped / dense@300")
    g = torch.Generator().manual_seed(0)
    for model in args.model:
        cfg = dit_config(model, args.tiny)
        attn = randomize_(CrossAttention(cfg, torch.nn), seed=1).to(device, dtype).eval()
        y_proj = torch.nn.Linear(cfg.caption_channels, cfg.width).to(device, dtype)
        embed = lambda c: y_proj(c.to(dtype))  # noqa: E731  (the caption projection's cost, one layer)
        depth = [attn] * cfg.depth  # every block's keys/values, as a generation prepares them
        for size in sizes(args):
            for name, lengths in CASES:
                B, n = len(lengths), size // 32
                x = torch.randn(B, n * n, cfg.width, generator=g).to(device, dtype)
                context = torch.randn(B, 300, cfg.caption_channels, generator=g).to(device, dtype)
                mask = (torch.arange(300)[None] < torch.tensor(lengths)[:, None]).to(device)
                longest = max(lengths)
                with torch.no_grad():
                    groups = caption_kv([attn], embed, context, mask)[0]
                    kv_max, bias_max = dense_kv(attn, embed, context[:, :longest], mask[:, :longest])
                    kv_all, bias_all = dense_kv(attn, embed, context, mask)
                    grouped = measure(lambda: attn(x, groups), device, args.warmup, args.runs)
                    at_max = measure(lambda: dense_attention(attn, x, kv_max, bias_max), device, args.warmup, args.runs)
                    at_all = measure(lambda: dense_attention(attn, x, kv_all, bias_all), device, args.warmup, args.runs)
                    prep_g = measure(lambda: caption_kv(depth, embed, context, mask), device, 0, 1)
                    prep_d = measure(lambda: [dense_kv(a, embed, context, mask) for a in depth], device, 0, 1)
                    diff = (attn(x, groups) - dense_attention(attn, x, kv_all, bias_all)).abs().max().item()
                ms = lambda r: f"{r['median_s'] * 1e3:9.2f}ms"  # noqa: E731
                print(f"{f'{model} {size}px {name}':<40}{ms(grouped)}{ms(at_max)}{ms(at_all)}   "
                      f"{ms(prep_g)} / {ms(prep_d)}   (max diff {diff:.1e})")


if __name__ == "__main__":
    main()
