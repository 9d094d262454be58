"""Every benchmark the speed issue asks for, one after another, each in its own process (so that no entry's
memory peak or compiled state carries into the next); writes the JSON of each and a Markdown summary (the
README's speed tables) to --out. With --tiny (a smoke test of the list) every entry runs in this one process,
through its script's `main(argv)`: the timings mean nothing there and one import of torch/diffusers/transformers
serves them all (bench/memory.py still measures each case in a process of its own).

    python bench/suite.py --device cuda --out bench/results/h100        (about 15 min on an H100)
    python bench/suite.py --device cpu --out bench/results/cpu          (the CPU subset, about 1 h on 2 cores)
    python bench/suite.py --tiny --plan gpu --device cpu --out /tmp/smoke   (checks that the GPU list runs)
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMPILED = "--compile reduce-overhead --warmup 3"  # CUDA graphs record on the first calls
GPU = [  # (file name, script, arguments)
    ("dit_step_bf16", "dit_step.py", "--model 0.6b 1.6b --size 512 1024 2048 4096 --dtype bf16"),
    ("dit_step_fp16", "dit_step.py", "--model 0.6b 1.6b --size 1024 --dtype fp16"),
    ("dit_step_compiled", "dit_step.py", f"--model 0.6b 1.6b --size 1024 --dtype bf16 {COMPILED}"),
    ("e2e_bf16", "e2e.py", "--model 0.6b 1.6b sprint-0.6b --size 1024 --dtype bf16"),
    ("e2e_fp16", "e2e.py", "--model 0.6b 1.6b sprint-0.6b --size 1024 --dtype fp16"),
    ("e2e_compiled", "e2e.py", f"--model 0.6b 1.6b sprint-0.6b --size 1024 --dtype bf16 {COMPILED}"),
    ("e2e_2048", "e2e.py", "--model 1.6b --size 2048 --dtype bf16"),
    ("decode", "decode.py", "--size 1024 2048 4096 --dtype bf16"),
    ("decode_tiled", "decode.py", "--size 4096 --dtype bf16 --tiled --max-memory 4"),
    ("gemma", "gemma.py", "--dtype bf16"),
    ("memory_1024", "memory.py", "--model 0.6b 1.6b --size 1024 --offload --dtype bf16 --steps 2"),
    ("memory_4096", "memory.py", "--model 1.6b --size 4096 --offload --dtype bf16 --steps 2"),
]
CPU = [
    ("e2e_bf16", "e2e.py", "--model 0.6b --size 512 --dtype bf16 --runs 2"),
    ("dit_step_bf16", "dit_step.py", "--model 0.6b 1.6b --size 512 1024 --dtype bf16"),
    ("decode", "decode.py", "--size 512 1024 --dtype bf16"),
    ("decode_tiled", "decode.py", "--size 2048 --dtype bf16 --tiled --tile-size 1024 --runs 1"),
    ("gemma", "gemma.py", "--dtype bf16"),
]


def markdown(results: dict[str, dict]) -> str:
    lines = []
    env = next(iter(results.values()))["environment"]
    lines.append(f"torch {env['torch']}, diffusers {env['diffusers']}, {env['gpu'] or env['cpu']}"
                 f" ({env['threads']} threads)\n")
    for name, res in results.items():
        lines.append(f"**{res['title']}** (`{name}`)\n")
        if "diffusers" in res["rows"][0]:
            lines += ["| case | ours | diffusers | speed-up | ours +GiB | diffusers +GiB |", "|---" * 6 + "|"]
            for r in res["rows"]:
                o, d = r["ours"], r["diffusers"]
                lines.append(f"| {r['case']} | {_t(o['median_s'])} | {_t(d['median_s'])} | "
                             f"{d['median_s'] / o['median_s']:.2f}x | {o['peak_gib']:.2f} | {d['peak_gib']:.2f} |")
        else:
            lines += ["| case | peak GiB | reserved GiB | time |", "|---|---|---|---|"]
            for r in res["rows"]:
                lines.append(f"| {r['case']} | {r['peak_gib']:.2f} | {r.get('reserved_gib', float('nan')):.2f} | "
                             f"{_t(r['seconds'])} |")
        lines.append("")
    return "\n".join(lines)


def _t(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True, help="folder for the JSON files and summary.md")
    p.add_argument("--tiny", action="store_true", help="tiny models, one run each, 2 steps, no compiling: a smoke "
                                                      "test of the suite")
    p.add_argument("--plan", choices=["gpu", "cpu"], help="which list to run (default: by --device)")
    p.add_argument("--only", nargs="+", help="run only these entries (file names)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = GPU if (args.plan or ("gpu" if args.device.startswith("cuda") else "cpu")) == "gpu" else CPU
    results = {}
    for name, script, extra in plan:
        if args.only and name not in args.only:
            continue
        extra = extra.split()
        if args.tiny:  # a smoke test of the list: no compiling (tested against eager in test_pipeline), 2 steps
            extra = [a for i, a in enumerate(extra) if "--compile" not in extra[max(0, i - 1):i + 1]]
            extra += ["--tiny", "--runs", "1", "--warmup", "0", *(["--steps", "2"] if script == "e2e.py" else [])]
        argv = [*extra, "--device", args.device, "--json", str(out / f"{name}.json")]
        print(f"== {name}: {script} {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        if args.tiny:
            importlib.import_module(Path(script).stem).main(argv)
        else:
            subprocess.run([sys.executable, str(HERE / script), *argv], check=True)
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
        results[name] = json.loads((out / f"{name}.json").read_text())
    (out / "summary.md").write_text(markdown(results))
    print(f"\nwrote {out / 'summary.md'}")


if __name__ == "__main__":
    main()
