"""GGUF: resident weight bytes per quant type for the real Sana DiTs and Gemma-2-2B (arithmetic on the real
shapes, built on `meta`, with the quantize command's own choice of type per tensor), and the CPU time of a DiT
step with Q8_0 weights against bf16 (same weights, compute in float32 both; one run, ratio printed).

    python bench/quantized_weights.py memory
    python bench/quantized_weights.py speed --width 64 2240 --depth 2 --tokens 256
    python bench/quantized_weights.py rss --folder /tmp/sana_gguf_rss   # writes 3 + 1.7 GB of random weights
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sana_core.dit import VARIANTS, DiTConfig, SanaDiT
from sana_core.quantize import DIT_QUANTIZED, GEMMA_QUANTIZED, pick_type
from sana_core.quantized import FLOAT_TYPES, T, bytes_of

TYPES = ("BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0")


def resident_bytes(shapes: dict[str, tuple[int, ...]], qtype: T, pattern) -> int:
    """Bytes of the weights as loaded: quantized tensors at their type's size, the rest in bf16."""
    total = 0
    for name, shape in shapes.items():
        target = pick_type(name, shape, qtype, pattern)
        total += bytes_of(shape, target) if target is not None and target not in FLOAT_TYPES else \
            2 * torch.Size(shape).numel()
    return total


def gemma_shapes() -> dict[str, tuple[int, ...]]:
    from transformers import Gemma2Config, Gemma2Model

    from sana_core.checkpoints.gemma import GEMMA2_2B

    with torch.device("meta"):
        model = Gemma2Model(Gemma2Config(**GEMMA2_2B))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def memory() -> None:
    models = {name: ({k: tuple(v.shape) for k, v in SanaDiT(VARIANTS[v], device="meta").state_dict().items()},
                     DIT_QUANTIZED) for name, v in (("Sana 0.6B", "sana-0.6b"), ("Sana 1.6B", "sana-1.6b"),
                                                    ("Sana 1.5 4.8B", "sana-1.5-4.8b"))}
    models["Gemma-2-2B"] = (gemma_shapes(), GEMMA_QUANTIZED)
    print("| model | " + " | ".join(TYPES) + " |")
    print("|---|" + "---|" * len(TYPES))
    for name, (shapes, pattern) in models.items():
        row = [resident_bytes(shapes, T[t], pattern) / 2**30 for t in TYPES]
        print(f"| {name} | " + " | ".join(f"{b:.2f} GiB" for b in row) + " |")


def speed(widths: list[int], depth: int, tokens: int, repeats: int) -> None:
    from sana_core.quantize import quantize_array
    from sana_core.quantized import GGUFOps, QuantizedTensor
    from sana_core.tiny import randomize_

    torch.manual_seed(0)
    for width in widths:
        cfg = DiTConfig(depth=depth, width=width, cross_heads=max(1, width // 112), caption_channels=2304)
        bf16 = randomize_(SanaDiT(cfg, dtype=torch.bfloat16, ops=GGUFOps)).requires_grad_(False)  # computes in x's dtype
        q8 = SanaDiT(cfg, dtype=torch.bfloat16, ops=GGUFOps)
        q8.load_state_dict(bf16.state_dict())
        q8.requires_grad_(False)
        for name, p in list(q8.named_parameters()):
            if DIT_QUANTIZED.fullmatch(name) and p.ndim == 2 and p.shape[-1] % 32 == 0:
                raw = torch.from_numpy(quantize_array(p.float().numpy(), T.Q8_0))
                module, _, attr = name.rpartition(".")
                setattr(q8.get_submodule(module), attr,
                        torch.nn.Parameter(QuantizedTensor(raw, T.Q8_0, p.shape), requires_grad=False))
        side = int(tokens ** 0.5)
        x, t, ctx = torch.randn(1, 32, side, side), torch.tensor([500.0]), torch.randn(1, 300, 2304)
        times = {}
        with torch.no_grad():
            for name, model in (("bf16", bf16), ("Q8_0", q8)):
                model(x, t, ctx)  # warm-up
                started = time.perf_counter()
                for _ in range(repeats):
                    model(x, t, ctx)
                times[name] = (time.perf_counter() - started) / repeats
        print(f"width {width}, {depth} blocks, {tokens} tokens, fp32 compute: bf16 {times['bf16'] * 1e3:.1f} ms, "
              f"Q8_0 {times['Q8_0'] * 1e3:.1f} ms, ratio {times['Q8_0'] / times['bf16']:.2f}")


def peak_rss(folder: Path) -> None:
    """Peak RSS of loading a real-size Sana 1.6B (random weights) from bf16 safetensors and from its Q8_0 GGUF,
    each in a fresh process, every weight byte read once after loading (memory-mapped files are read lazily); the
    import alone is measured too (Linux: /proc/self/status VmHWM)."""
    import subprocess

    from sana_core.checkpoints.dit import save_dit
    from sana_core.quantize import main as quantize

    folder.mkdir(parents=True, exist_ok=True)
    bf16, q8 = folder / "sana_1600m_random_bf16.safetensors", folder / "sana_1600m_random_Q8_0.gguf"
    if not bf16.exists():
        model = SanaDiT(VARIANTS["sana-1.6b"], dtype=torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(std=0.02)
        save_dit(model, bf16, layout="nvlabs")
        del model
    if not q8.exists():
        quantize([str(bf16), str(q8), "--type", "Q8_0"])
    code = ("import re, sys, torch; from sana_core.checkpoints.dit import load_dit; "  # VmHWM: this process's peak
            "m = load_dit(sys.argv[1]) if sys.argv[1] != '-' else None; "        # (ru_maxrss carries the parent's)
            "[p.detach().as_subclass(torch.Tensor).view(torch.uint8).sum() for p in (m.parameters() if m else [])]; "
            "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024)")
    root = str(Path(__file__).resolve().parents[1])
    for name, path in (("import only", "-"), ("bf16 safetensors", bf16), ("Q8_0 GGUF", q8)):
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=root,
                             check=True)
        size = path.stat().st_size / 2**30 if path != "-" else 0
        print(f"{name}: file {size:.2f} GiB, peak RSS {int(out.stdout.split()[-1]) / 2**30:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("memory", "speed", "rss"))
    parser.add_argument("--folder", type=Path, default=Path("/tmp/sana_gguf_rss"), help="rss: where the files go")
    parser.add_argument("--width", type=int, nargs="+", default=[64, 2240])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.what == "memory":
        memory()
    elif args.what == "speed":
        speed(args.width, args.depth, args.tokens, args.repeats)
    else:
        peak_rss(args.folder)


if __name__ == "__main__":
    main()
