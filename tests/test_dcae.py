"""DC-AE: parity with diffusers' AutoencoderDC (fp32), both file layouts, variant detection, real-config
parameter counts, tiling (blending, closeness, auto/forced, OOM fallback) and loader errors."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC
from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

import sana_core.dcae as dcae
import sana_core.dcae_tiling as tiling
from sana_core.checkpoints import CheckpointError
from sana_core.checkpoints.dcae import (config_from_diffusers, diffusers_config, from_efficientvit, infer_config,
                                        load_dcae, to_efficientvit)
from sana_core.dcae import DCAE, VARIANTS
from sana_core.dcae_tiling import peak_activation_bytes, tiled_apply
from sana_core.tiny import randomize_, tiny_dcae_config, write_tiny_dcae

FULL, LITE = "dc-ae-f32c32-sana-1.0", "dc-ae-lite-f32c32-sana-1.1"
TOL = 1e-5  # max |ours - diffusers| / max |diffusers|, fp32

# vae/config.json of Efficient-Large-Model/Sana_600M_1024px_diffusers (= mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers)
SANA_1_0_CONFIG = {
    "_class_name": "AutoencoderDC", "attention_head_dim": 32, "decoder_act_fns": "silu",
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3, "decoder_layers_per_block": [3] * 6,
    "decoder_norm_types": "rms_norm", "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "downsample_block_type": "Conv", "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3, "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]], "in_channels": 3, "latent_channels": 32,
    "scaling_factor": 0.41407, "upsample_block_type": "interpolate",
}
# dc-ae-lite-f32c32-sana-1.1: efficientvit `dc_ae_f32c32` ("decoder.block_type=ResBlock decoder.depth_list=[0,3,5,4,4,4]
# decoder.out_act=silu", pixel-shuffle upsampling by default) in diffusers terms (as diffusers PR #12169 added it).
LITE_CONFIG = {**SANA_1_0_CONFIG, "decoder_block_types": "ResBlock", "decoder_layers_per_block": [0, 3, 5, 4, 4, 4],
               "decoder_qkv_multiscales": [[]] * 6, "upsample_block_type": "pixel_shuffle",
               "decoder_conv_act_fn": "silu"}


def rel_max(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def smooth_image(h, w, batch=1):
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([torch.sin(2 * math.pi * x), torch.cos(2 * math.pi * y), 2 * x * y - 1])
    return img.expand(batch, -1, -1, -1).contiguous()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny DC-AEs of both structures in both layouts; same seed -> same weights."""
    root = tmp_path_factory.mktemp("dcae")
    return {(v, layout): write_tiny_dcae(root / f"{v}-{layout}", seed=1, layout=layout, variant=v)
            for v in (FULL, LITE) for layout in ("diffusers", "efficientvit")}


@pytest.fixture(scope="module")
def tiny(files):
    return load_dcae(files[FULL, "diffusers"])


@pytest.mark.parametrize("variant", [FULL, LITE])
def test_matches_diffusers_fp32(files, variant):
    ours = load_dcae(files[variant, "diffusers"])
    ref = AutoencoderDC.from_pretrained(files[variant, "diffusers"]).eval()
    x = torch.rand(2, 3, 64, 96) * 2 - 1  # latent 2x3: the last stages run diffusers' quadratic branch
    with torch.no_grad():
        z, z_ref = ours.encode(x), ref.encode(x).latent
        img, img_ref = ours.decode(z_ref), ref.decode(z_ref).sample
    assert z.shape == (2, 32, 2, 3) and img.shape == x.shape
    assert rel_max(z, z_ref) < TOL and rel_max(img, img_ref) < TOL
    assert ours.variant == variant and ours.cfg == tiny_dcae_config(variant)


def test_linear_attention_accumulates_in_fp32():
    """fp16 in and out, but sums of 20 products of ~60^2 would overflow fp16 (65504) if accumulated in it."""
    qkv = (torch.randn(2, 2 * 3 * 8, 4, 5) * 60).half()
    out = dcae.linear_attention(qkv, 8)
    q, k, v = qkv.double().reshape(2, 2, 24, 20).chunk(3, dim=2)       # 3 x (B, heads, d, N)
    scores = F.relu(k).transpose(-1, -2) @ F.relu(q)                   # (B, heads, N_k, N_q)
    ref = (v @ scores) / (scores.sum(2, keepdim=True) + 1e-15)          # (B, heads, d, N_q)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert rel_max(out.double(), ref.reshape(2, 16, 4, 5)) < 1e-3        # fp16 output rounding only


@pytest.mark.parametrize("variant", [FULL, LITE])
def test_efficientvit_layout(files, variant):
    ours = load_dcae(files[variant, "diffusers"]).state_dict()
    raw = load_file(str(files[variant, "efficientvit"] / "model.safetensors"))
    converted = from_efficientvit(raw)
    assert set(converted) == set(ours) and all(torch.equal(converted[k], ours[k]) for k in ours)
    oracle = convert_autoencoder_dc_checkpoint_to_diffusers(dict(raw))
    # diffusers' single-file converter names the lite decoder's final upsampler `conv_out` instead of
    # `conv_out.conv` (its AutoencoderDC module itself uses `conv_out.conv`): everything else must agree.
    renamed = {"decoder.conv_out.weight": "decoder.conv_out.conv.weight",
               "decoder.conv_out.bias": "decoder.conv_out.conv.bias"} if variant == LITE else {}
    oracle = {renamed.get(k, k): v for k, v in oracle.items()}
    assert set(oracle) == set(ours) and all(torch.equal(oracle[k].reshape(ours[k].shape), ours[k]) for k in ours)
    model = load_dcae(files[variant, "efficientvit"])
    assert model.variant == variant and model.cfg == tiny_dcae_config(variant)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_real_configs_detected_from_shapes(variant):
    with torch.device("meta"):
        sd = DCAE(VARIANTS[variant]).state_dict()
    name = FULL if variant.endswith("sana-1.1") and "lite" not in variant else variant  # 1.1 = 1.0 architecture
    assert infer_config(sd) == (name, VARIANTS[variant])
    evit = to_efficientvit(sd, VARIANTS[variant])
    assert infer_config(from_efficientvit(evit)) == (name, VARIANTS[variant])
    decoder_only = {k: v for k, v in sd.items() if k.startswith("decoder.")}
    assert infer_config(decoder_only) == (name, VARIANTS[variant])
    if "lite" not in variant:
        assert len(evit) == 339  # the key count of mit-han-lab/dc-ae-f32c32-sana-1.0 model.safetensors


@pytest.mark.parametrize("variant,config", [(FULL, SANA_1_0_CONFIG), (LITE, LITE_CONFIG)])
def test_real_parameter_counts_match_diffusers(variant, config):
    assert config_from_diffusers(config) == VARIANTS[variant]
    with torch.device("meta"):
        ours = DCAE(VARIANTS[variant])
        ref = AutoencoderDC(**{k: v for k, v in config.items() if not k.startswith("_")})
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(ours) == shapes(ref)
    counts = {FULL: (312_250_275, 159_223_171), LITE: (421_181_228, 268_154_124)}[variant]
    assert (sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in ours.decoder.parameters())) == counts
    assert sum(p.numel() for p in ref.parameters()) == counts[0]
    assert list(ours.buffers()) == []


def test_diffusers_config_round_trip():
    for v in VARIANTS:
        assert config_from_diffusers(diffusers_config(VARIANTS[v])) == VARIANTS[v]


def test_tiled_apply_blends_exactly_for_pointwise_maps():
    """Coverage, placement and weight normalisation: a position-independent map is reproduced exactly."""
    z = torch.randn(2, 4, 11, 7)
    up = lambda t: F.interpolate(t, scale_factor=32) * 2 + 1
    out = tiled_apply(up, z, tile=4, overlap=2, scale_in=1, scale_out=32)
    assert torch.allclose(out, up(z), atol=1e-6)
    img = torch.randn(1, 3, 9 * 32, 6 * 32)
    down = lambda t: F.avg_pool2d(t, 32)
    assert torch.allclose(tiled_apply(down, img, tile=3, overlap=1, scale_in=32, scale_out=1), down(img), atol=1e-6)


def test_tiled_apply_crossfades_linearly():
    """Two 4-latent tiles sharing 2 latents (64 px): tile means 1.5 and 3.5 cross-fade linearly over 64 px."""
    z = torch.arange(6.0).reshape(1, 1, 1, 6)
    mean = lambda t: torch.full((1, 1, 32 * t.shape[-2], 32 * t.shape[-1]), t.mean().item())
    row = tiled_apply(mean, z, tile=4, overlap=2, scale_in=1, scale_out=32)[0, 0, 0]
    fade = 1.5 + 2 * (torch.arange(64) + 0.5) / 64
    assert torch.allclose(row, torch.cat([torch.full((64,), 1.5), fade, torch.full((64,), 3.5)]), atol=1e-6)


def test_tiled_close_to_untiled(tiny):
    """Smooth 512x512 image; relative L2 error of tiled vs untiled. This tiny random model attends globally
    (ReLU attention with random weights averages over the whole input), so a tile sees other statistics than
    the full image; trained weights are more local. Measured (seed 1; 8 random models in brackets):
    decode 384/256 px tiles/overlap 0.049 [0.040-0.054], 384/128 0.104 [0.058-0.104], 256/128 0.155 [0.089-0.155],
    256/0 0.357 [0.22-0.36]; encode 256/128 0.30 [0.20-0.39], 256/0 0.42 [0.33-0.54]."""
    img = smooth_image(512, 512)
    err = lambda a, b: ((a - b).norm() / b.norm()).item()
    with torch.no_grad():
        z = tiny.encode(img, tiled=False)
        x = tiny.decode(z, tiled=False)
        dec = {(t, o): err(tiny.decode(z, tiled=True, tile_size=t, overlap=o), x)
               for t, o in ((384, 256), (384, 128), (256, 128), (256, 0))}
        enc = {o: err(tiny.encode(img, tiled=True, tile_size=256, overlap=o), z) for o in (128, 0)}
    assert dec[384, 256] < 0.07 and dec[384, 128] < 0.13 and dec[256, 128] < 0.2
    assert dec[384, 256] < dec[384, 128] and dec[256, 128] < dec[256, 0] / 2
    assert enc[128] < 0.35 and enc[128] < enc[0]


def test_tile_plan_uses_fewest_smallest_tiles():
    for length, tile, overlap in ((128, 48, 8), (128, 32, 8), (64, 48, 8), (100, 33, 5), (7, 4, 2), (5, 8, 2)):
        size, starts = tiling.tile_plan(length, tile, overlap)
        n = len(starts)
        assert size <= tile and starts[0] == 0 and starts[-1] + size == length            # inside, covers the ends
        assert all(0 < b - a <= size - overlap for a, b in zip(starts, starts[1:]))     # no gap, shares >= overlap
        assert n == 1 or (n - 1) * (tile - overlap) + tile < length + tile - overlap      # n - 1 tiles would not do
        assert n == 1 or n * (size - 1) - (n - 1) * overlap < length                      # one px smaller would not
    assert tiling.tile_plan(128, 48, 8) == (48, [0, 40, 80])  # 4096 px in 1536 px tiles sharing 256 px: 9 tiles


def test_tiling_auto_forced_and_small_inputs(tiny, monkeypatch, caplog):
    z = torch.randn(1, 32, 4, 6)
    with torch.no_grad():
        plain = tiny.decoder(z)
        assert torch.equal(tiny.decode(z), plain)                          # CPU, small: untiled
        assert torch.equal(tiny.decode(z, tiled=True, tile_size=256), plain)  # fits one tile
        forced = tiny.decode(z, tiled=True, tile_size=64, overlap=32)
        assert not torch.equal(forced, plain) and forced.shape == plain.shape
        need = tiny.memory_needed(z.shape, z.dtype)
        assert torch.equal(tiny.decode(z, tile_size=64, overlap=32, max_memory=need - 1), forced)  # over budget
        assert torch.equal(tiny.decode(z, tile_size=64, overlap=32, max_memory=need), plain)
        img = smooth_image(128, 192)
        need = tiny.memory_needed(img.shape, img.dtype, decode=False)
        assert torch.equal(tiny.encode(img, tile_size=64, overlap=32, max_memory=need - 1),
                           tiny.encode(img, tiled=True, tile_size=64, overlap=32))
        assert torch.equal(tiny.encode(img, tile_size=64, overlap=32, max_memory=need), tiny.encoder(img))
        monkeypatch.setattr(tiling, "free_memory", lambda device: need - 1)  # the device's free memory decides too
        assert torch.equal(tiny.decode(z, tile_size=64, overlap=32), forced)
        # default tile: the largest (<= 2048 px) whose estimate fits the memory
        widths, depths = tiny.cfg.decoder_widths, tiny.cfg.decoder_depths
        fits = lambda px: peak_activation_bytes(widths, depths, px * px, z.dtype)
        monkeypatch.setattr(tiling, "free_memory", lambda device: fits(96))
        monkeypatch.setattr(tiling, "MIN_TILE", 32)
        with caplog.at_level("INFO", logger="sana_core.dcae"):
            assert torch.equal(tiny.decode(z), tiny.decode(z, tiled=True, tile_size=96, overlap=0))
        assert "96 px tiles" in caplog.text
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny.decode(z, tiled=True, tile_size=100)
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny.encode(torch.zeros(1, 3, 70, 64))


def test_free_memory_and_estimates(monkeypatch):
    assert 2**20 < tiling.free_memory(torch.device("cpu")) < 2**50  # MemAvailable here
    cuda = SimpleNamespace(type="cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (6 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1 * 2**30)
    assert tiling.free_memory(cuda) == 8 * 2**30  # 6 free + (3 reserved - 1 allocated)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 12 * 2**30)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 5 * 2**30)
    assert tiling.free_memory(SimpleNamespace(type="mps")) == 7 * 2**30
    c = VARIANTS[FULL]  # documented bf16 peaks of an untiled Sana decode: 7.1 GiB at 2048 px, 26.7 GiB at 4096 px
    for side, gib in ((2048, 7.1), (4096, 26.7)):
        est = peak_activation_bytes(c.decoder_widths, c.decoder_depths, side * side, torch.bfloat16) / 2**30
        assert 0.9 * gib < est < 1.2 * gib
        assert DCAE(c, encoder=False).to("meta").memory_needed((1, 32, side // 32, side // 32), torch.bfloat16) \
            == int(est * 2**30)


def test_oom_falls_back_to_tiles(tiny, monkeypatch):
    z = torch.randn(1, 32, 4, 6)
    with torch.no_grad():
        tiled = tiny.decode(z, tiled=True, tile_size=64, overlap=32)
        halved = tiny.decode(z, tiled=True, tile_size=64, overlap=0)
        real = tiny.decoder.forward

        def forward(h, tick=lambda: None):  # "out of memory" on anything bigger than a 2x2 latent tile
            if h.shape[-1] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(h, tick)

        monkeypatch.setattr(tiny.decoder, "forward", forward)
        assert torch.equal(tiny.decode(z, tile_size=64, overlap=32), tiled)
        monkeypatch.setattr(tiling, "MIN_TILE", 64)
        assert torch.equal(tiny.decode(z, tiled=True, tile_size=128, overlap=32), halved)  # tiles OOM: halved

        def tiny_forward(h, tick=lambda: None):  # nothing bigger than 1x1 fits: 1x1 tiles cost too much
            if h.shape[-1] > 1:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(h, tick)

        monkeypatch.setattr(tiny.decoder, "forward", tiny_forward)
        with pytest.raises(torch.OutOfMemoryError):
            tiny.decode(z, tiled=False)
        with pytest.raises(torch.OutOfMemoryError):
            tiny.decode(z, tiled=True, tile_size=64)


def test_ops_injection_dtype_and_no_buffers(files, recording_ops):
    ops, made = recording_ops
    model = load_dcae(files[FULL, "diffusers"], dtype=torch.bfloat16, ops=ops)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert layers and all(type(m) in (ops.Conv2d, ops.Linear) for m in layers) and len(made) == len(layers)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and list(model.buffers()) == []
    ref = load_dcae(files[FULL, "diffusers"])
    z = torch.randn(1, 32, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, expected = model.decode(z.bfloat16()), ref.decode(z)
    # bf16 through ~50 random layers: relative L2 error 0.02-0.06 over seeds (0.026 for this one)
    assert out.dtype == torch.bfloat16 and ((out.float() - expected).norm() / expected.norm()).item() < 0.1
    assert torch.allclose(ref.unscale(ref.scale(z)), z) and ref.cfg.scaling_factor == 0.41407


def test_file_and_folder_forms(files, tmp_path):
    ref = load_dcae(files[FULL, "diffusers"]).state_dict()
    sd = load_file(str(files[FULL, "diffusers"] / "diffusion_pytorch_model.safetensors"))
    prefixed = {**{f"vae.{k}": v for k, v in sd.items()}, "text_encoder.w": torch.ones(2)}
    save_file(prefixed, tmp_path / "prefixed.safetensors")
    evit = load_file(str(files[FULL, "efficientvit"] / "model.safetensors"))
    torch.save({"state_dict": evit}, tmp_path / "dc_ae.pth")
    pipe = tmp_path / "sana_pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    write_tiny_dcae(pipe / "vae", seed=1)
    for path in (tmp_path / "prefixed.safetensors", tmp_path / "dc_ae.pth", pipe, files[FULL, "efficientvit"]):
        loaded = load_dcae(path).state_dict()
        assert all(torch.equal(loaded[k], ref[k]) for k in ref) and set(loaded) == set(ref)


def test_decoder_only_file(files, tmp_path, tiny):
    sd = load_file(str(files[FULL, "diffusers"] / "diffusion_pytorch_model.safetensors"))
    save_file({k: v for k, v in sd.items() if k.startswith("decoder.")}, tmp_path / "decoder.safetensors")
    model = load_dcae(tmp_path / "decoder.safetensors")
    z = torch.randn(1, 32, 2, 3)
    with torch.no_grad():
        assert model.encoder is None and torch.equal(model.decode(z), tiny.decode(z))
    with pytest.raises(ValueError, match="encoder weights are missing"):
        model.encode(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize("keys,found", [
    (["first_stage_model.decoder.conv_in.weight", "first_stage_model.decoder.mid.block_1.conv1.weight",
      "first_stage_model.encoder.conv_in.weight"], "Stable Diffusion / SDXL"),
    (["decoder.conv_in.weight", "decoder.up_blocks.0.resnets.0.conv1.weight",
      "decoder.mid_block.resnets.0.conv1.weight"], "AutoencoderKL"),
    (["x_embedder.proj.weight", "blocks.0.attn.qkv.weight", "t_block.1.weight"], "diffusion transformer"),
])
def test_not_a_dcae(tmp_path, keys, found):
    save_file({k: torch.zeros(1) for k in keys}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=rf"not a DC-AE.*{found}.*expected diffusers AutoencoderDC keys"):
        load_dcae(tmp_path / "other.safetensors")


def test_broken_files(files, tmp_path):
    data = (files[FULL, "diffusers"] / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_dcae(tmp_path / "truncated.safetensors")
    sd = load_file(str(files[FULL, "diffusers"] / "diffusion_pytorch_model.safetensors"))
    missing = "decoder.up_blocks.4.1.attn.to_v.weight"
    save_file({k: v for k, v in sd.items() if k != missing}, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys.*up_blocks\.4\.1\.attn\.to_v"):
        load_dcae(tmp_path / "missing.safetensors")
    save_file({k: v for k, v in sd.items() if "up_blocks.5.2." not in k}, tmp_path / "short.safetensors")
    with pytest.raises(CheckpointError, match=r"unknown DC-AE decoder \(depths \(3, 3, 3, 3, 3, 2\)"):
        load_dcae(tmp_path / "short.safetensors")
    folder = tmp_path / "bn"
    write_tiny_dcae(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "decoder_norm_types": "batch_norm"}))
    with pytest.raises(CheckpointError, match="config.json: unusable AutoencoderDC config.*batch_norm"):
        load_dcae(folder)
    with pytest.raises(FileNotFoundError):
        load_dcae(tmp_path / "nowhere")


def test_real_size_bf16_decode_error_no_larger_than_diffusers():
    """The real Sana DC-AE, random weights, a 64px decode: our bf16 error against our fp32 decode is no larger
    than diffusers' bf16 error against theirs (measured at 256 px: 0.0163/0.0146/0.0182 vs 0.0166/0.0145/0.0180,
    3 seeds; the size only sets how many pixels the same per-layer rounding is measured on)."""
    cfg = VARIANTS["dc-ae-f32c32-sana-1.1"]
    ours = randomize_(DCAE(cfg), seed=1).eval()
    with torch.device("meta"):
        ref = AutoencoderDC(**{k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")})
    ref.load_state_dict(ours.state_dict(), assign=True)
    z = torch.randn(1, 32, 2, 2, generator=torch.Generator().manual_seed(1))
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    with torch.no_grad():
        exact, exact_ref = ours.decode(z, tiled=False), ref.eval().decode(z).sample
        assert rel(exact, exact_ref) < 1e-5
        got = ours.to(torch.bfloat16).decode(z.bfloat16(), tiled=False)
        want = ref.to(torch.bfloat16).decode(z.bfloat16()).sample
    assert rel(got, exact) <= 1.1 * rel(want, exact_ref), (rel(got, exact), rel(want, exact_ref))


def test_float16_overflow_switches_to_bfloat16(files, caplog):
    """run_finite: an overflowing float16 encode (or decode) is redone in bfloat16 with a warning; inf/NaN in
    another dtype is an error naming the file."""
    vae = load_dcae(files[FULL, "diffusers"], dtype=torch.float16)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e5)  # activations beyond float16's 65504
        img = smooth_image(64, 96)
        assert not torch.isfinite(vae.encode(img.half())).all()
        with caplog.at_level("WARNING", logger="sana_core.precision"):
            z = dcae.run_finite(vae, "encode", img)
        assert torch.isfinite(z).all() and z.dtype == torch.bfloat16 and next(vae.parameters()).dtype == torch.bfloat16
        assert "the DC-AE encoder overflowed in float16 (inf/NaN); computing in torch.bfloat16" in caplog.text
        vae.decoder.conv_in.weight[0, 0, 0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match=r"dc-ae.*: the DC-AE decoder produced inf/NaN computing in "
                                                     r"torch.bfloat16"):
            dcae.run_finite(vae, "decode", z)
