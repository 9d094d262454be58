"""Core's contracts, checked on the real ComfyUI (tests/comfy_probe.py runs in its Python, without a server).

What we subclass or build must keep what core's own objects have: a `comfy.sd.VAE` subclass that cannot call
core's constructor sets every attribute that constructor sets (on the host here, and in core 0.38.1 as read),
patchers are the class core builds its models with, and core CLIPTextEncode on the Sana CLIP gives the engine's
caption embeddings for whichever side the conditioning is sampled as.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from comfy_server import ROOT, comfyui

#: Attributes core 0.38.1's `comfy.sd.VAE.__init__` sets (read from Comfy-Org/ComfyUI comfy/sd.py); a new one in a
#: later core is one more name here.
CORE_0_38_VAE = {
    "memory_used_encode", "memory_used_decode", "downscale_ratio", "upscale_ratio", "latent_channels", "latent_dim",
    "output_channels", "pad_channel_value", "process_input", "process_output", "working_dtypes", "disable_offload",
    "not_video", "size", "downscale_index_formula", "upscale_index_formula", "extra_1d_channel", "crop_input",
    "handles_tiling", "format_encoded", "audio_sample_rate", "first_stage_model", "device", "vae_dtype",
    "output_device", "patcher"}


@pytest.fixture(scope="module")
def facts(server):
    comfy, python = comfyui()
    out = subprocess.run([python, str(ROOT / "tests" / "comfy_probe.py"), str(ROOT), str(server.sana)], cwd=comfy,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sana_vae_has_every_attribute_core_sets(facts):
    assert facts["vae_missing"] == []                          # the host's core
    assert sorted(CORE_0_38_VAE - set(facts["vae_attributes"])) == []  # core 0.38.1


def test_patchers_are_cores(facts):
    assert facts["dit_patcher"] == facts["core_patcher"] == facts["vae_patcher"]


@pytest.mark.parametrize("side", ["positive", "negative"])
def test_clip_text_encode_equals_the_engine(facts, side):
    assert facts[f"{side}_max_diff"] <= 1e-5 and facts[f"{side}_mask_equal"]


def test_a_zeroed_negative_stays_zero(facts):
    assert facts["zeroed_negative_is_zero"]


def test_every_dit_weight_is_reachable_by_cores_patcher(facts):
    """Core's patcher loads and patches leaf modules only: a parameter on a module with children (the blocks'
    scale_shift_table) would be missed by merges, LoRAs and weight patches."""
    assert facts["dit_parameters"] > 20 and facts["unpatchable"] == []


def test_concatenated_prompts_are_both_attended(facts):
    assert facts["concat_mask_equal"]


def test_a_foreign_controlnet_is_refused_by_name(facts):
    assert "is not a Sana ControlNet" in facts["foreign_controlnet"]
