"""Loading never holds two copies of the weights: peak anonymous memory while loading ~ the loaded model.

Measured in a subprocess by sampling RssAnon (memory-mapped file pages are page cache, not a copy).
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import re, sys, threading, time, torch
from sana_core.checkpoints.dit import load_dit

def anon():
    return int(re.search(r"RssAnon:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

peak, done = [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)

base = anon()
t = threading.Thread(target=watch)
t.start()
model = load_dit(sys.argv[1], dtype=torch.bfloat16)
done.set()
t.join()
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(size, max(peak[0], anon()) - base)
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    import torch

    from sana_core.checkpoints.dit import save_dit
    from sana_core.dit import DiTConfig, SanaDiT

    d = tmp_path_factory.mktemp("big")
    model = SanaDiT(DiTConfig(depth=2, width=1152, cross_heads=16))  # ~190 MB in fp32
    return {
        "nvlabs.safetensors": save_dit(model, d / "nvlabs.safetensors", layout="nvlabs"),
        "diffusers folder": save_dit(model, d / "transformer", layout="diffusers"),
        "nvlabs.pth": save_dit(model, d / "nvlabs.pth", layout="nvlabs", dtype=torch.float32),
    }


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("which", ["nvlabs.safetensors", "diffusers folder", "nvlabs.pth"])
def test_fp32_file_loads_as_bf16_with_one_copy(big, which):
    out = subprocess.run([sys.executable, "-c", PROBE, str(big[which])], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    size, peak = map(int, out.stdout.split())
    assert size > 80e6
    # the fp32 file is twice the bf16 model: holding it (or a second copy) would exceed this bound
    assert peak < 1.25 * size + 16e6, (peak / 1e6, size / 1e6)
