"""The benchmarks run: the GPU suite's whole list, with tiny models on the CPU (times are not checked).

--tiny runs every entry at 2 steps and without compiling (what compiling gives is checked against eager in
test_pipeline.py), all in one process, on one thread: beside the other xdist worker on 2 cores, two threads wait
on each other at every small op (a tiny bf16 DC-AE decode: 36 s on two threads under load, 0.5 s on one), and
nothing here compares numbers with another process."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import suite  # noqa: E402
from harness import TINY_SIZE  # noqa: E402


def test_gpu_suite_runs_with_tiny_models(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "suite.py"), "--tiny", "--plan", "gpu",
                          "--device", "cpu", "--out", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    for name, script, _ in suite.GPU:
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert f"(`{name}`)" in summary and result["environment"]["torch"]
        for row in result["rows"]:
            assert row["case"] in summary
            if script == "memory.py":  # our pipeline alone, in its own process
                assert row["peak_gib"] > 0.05 and row["seconds"] > 0
            else:
                o, d = row["ours"], row["diffusers"]
                assert len(o["runs_s"]) == len(d["runs_s"]) == 1 and min(o["median_s"], d["median_s"]) > 0
                assert row["speedup"] == d["median_s"] / o["median_s"] and o["peak_gib"] >= 0
    cases = {r["case"] for n in ("e2e_bf16", "memory_1024")
             for r in json.loads((tmp_path / f"{n}.json").read_text())["rows"]}
    px = TINY_SIZE
    assert {f"0.6b {px}px 2 steps CFG", f"sprint-0.6b {px}px 2 steps", f"1.6b {px}px 2 steps offload"} <= cases


def test_caption_attention_bench_candidates_agree(capsys):
    """bench/caption_attention.py runs (tiny widths) and its two candidates, each caption on its real tokens and
    the padded batch with a mask bias, give the same cross-attention output."""
    import re

    import caption_attention

    caption_attention.main(["--tiny", "--model", "0.6b", "--size", "128", "--device", "cpu", "--dtype", "fp32",
                            "--runs", "1", "--warmup", "0"])
    diffs = [float(d) for d in re.findall(r"max diff ([0-9.e+-]+)\)", capsys.readouterr().out)]
    assert len(diffs) == len(caption_attention.CASES) and max(diffs) < 1e-5, diffs
