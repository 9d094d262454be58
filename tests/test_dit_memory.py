"""The DiT's activation-memory estimate (what ComfyUI reserves before sampling) against the measured peak of
live tensors (bench/peak.py, CUDA's max_memory_allocated count) on real Sana widths; and the device-safe
timestep truncation and positional embedding (no float64 on the device)."""
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sana_core.dit import VARIANTS, SanaDiT, activation_bytes
from sana_core.samplers import flow_sigmas, trunc_1000

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from peak import PeakTensors  # noqa: E402


def measured_peak(variant: str, depth: int, px: int, batch: int, dtype: torch.dtype) -> int:
    """Peak bytes of a forward with a full 300-token caption (the worst case ComfyUI must reserve for)."""
    cfg = replace(VARIANTS[variant], depth=depth)
    g = torch.Generator().manual_seed(0)
    model = SanaDiT(cfg, dtype=dtype)
    for p in model.parameters():
        p.data.normal_(0, 0.02, generator=g)
    h = px // 32
    x = torch.randn(batch, 32, h, h, generator=g).to(dtype)
    context = torch.randn(batch, 300, cfg.caption_channels, generator=g).to(dtype)
    with torch.no_grad(), PeakTensors(existing=model.parameters()) as peak:
        model(x, torch.full((batch,), 500.0), context, torch.ones(batch, 300, dtype=torch.long))
    return peak.peak


@pytest.mark.parametrize("variant,depth,px,batch,dtype", [
    ("sana-0.6b", 1, 256, 1, torch.float32), ("sana-0.6b", 2, 512, 2, torch.float32),
    ("sana-0.6b", 1, 512, 1, torch.bfloat16), ("sana-1.6b", 1, 512, 1, torch.float32),
    ("sana-1.6b", 2, 256, 2, torch.float32)])
def test_activation_estimate_within_1_3x_of_the_measured_peak(variant, depth, px, batch, dtype):
    cfg = replace(VARIANTS[variant], depth=depth)
    ratio = activation_bytes(cfg, batch, (px // 32) ** 2, dtype) / measured_peak(variant, depth, px, batch, dtype)
    assert 1.0 <= ratio <= 1.3, ratio


def test_trunc_1000_is_the_float64_truncation_without_float64():
    g = torch.Generator().manual_seed(0)
    s = torch.cat([torch.rand(200_000, generator=g), torch.arange(1001) / 1000, flow_sigmas(300, 6.0),
                   torch.tensor([0.0, 1.0, 1.0000037, 1e-40, 0.999, 0.001])])
    assert torch.equal(trunc_1000(s), torch.trunc(s.double() * 1000).float())
