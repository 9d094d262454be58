"""DiT checkpoints in every real layout load strictly to the same model; bad files raise clear errors."""
import json
from dataclasses import replace

import pytest
import torch
from diffusers import SanaTransformer2DModel
from safetensors.torch import save_file

from sana_core.checkpoints import CheckpointError
from sana_core.checkpoints.dit import load_dit, save_dit
from sana_core.dit import VARIANTS, DiTConfig, SanaDiT
from sana_core.tiny import randomize_

TINY = DiTConfig(depth=2, width=64, cross_heads=2, caption_channels=48)


def _probe(model: SanaDiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 3, 5, generator=g)
    ctx = torch.randn(2, 6, model.cfg.caption_channels, generator=g)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    guidance = torch.tensor([4.5, 4.5]) if model.cfg.guidance_embed else None
    with torch.no_grad():
        return model.float()(x, torch.tensor([700.0, 20.0]), ctx, mask, guidance=guidance)


@pytest.fixture(scope="module")
def tiny():
    return randomize_(SanaDiT(TINY), seed=7).eval()


@pytest.mark.parametrize("how", [
    "pth", "pth_extra_keys", "nvlabs_safetensors_prefixed", "diffusers_folder", "diffusers_root",
    "diffusers_sharded", "diffusers_variant", "diffusers_single_file_prefixed",
])
def test_layouts_load_identically(tiny, tmp_path, how):
    want = _probe(tiny)
    if how == "pth":
        path = save_dit(tiny, tmp_path / "Sana_600M_1024px_MultiLing.pth", layout="nvlabs")
    elif how == "pth_extra_keys":  # training-only keys in the real .pth files
        sd = dict(tiny.state_dict(), **{"y_embedder.y_embedding": torch.randn(300, 48), "pos_embed": torch.randn(1, 4, 64)})
        path = tmp_path / "m.pth"
        torch.save({"state_dict": sd}, path)
    elif how == "nvlabs_safetensors_prefixed":
        path = save_dit(tiny, tmp_path / "m.safetensors", layout="nvlabs", prefix="model.diffusion_model.")
    elif how == "diffusers_folder":
        path = save_dit(tiny, tmp_path / "transformer")
    elif how == "diffusers_root":
        save_dit(tiny, tmp_path / "transformer")
        (tmp_path / "model_index.json").write_text("{}")
        path = tmp_path
    elif how == "diffusers_sharded":
        path = save_dit(tiny, tmp_path / "transformer", shards=3)
    elif how == "diffusers_variant":
        path = save_dit(tiny, tmp_path / "transformer", dtype=torch.bfloat16, variant="bf16")
    else:
        path = save_dit(tiny, tmp_path / "m.safetensors", layout="diffusers", prefix="model.")
    model = load_dit(path)
    if how == "diffusers_variant":
        assert model.dtype == torch.bfloat16  # dtype=None keeps the file's
        tiny = SanaDiT(TINY).to(torch.bfloat16)
        tiny.load_state_dict(model.state_dict())
        torch.testing.assert_close(_probe(model), _probe(tiny))
        return
    torch.testing.assert_close(_probe(model), want, rtol=0, atol=0)


def test_diffusers_saved_folder_loads(tiny, tmp_path):
    """A folder written by diffusers itself (save_pretrained) loads and matches."""
    from sana_core.checkpoints.dit import nvlabs_to_diffusers

    c = TINY
    ref = SanaTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, num_layers=2, num_cross_attention_heads=2,
        cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=48, sample_size=c.base_size)
    ref.load_state_dict(nvlabs_to_diffusers(tiny.state_dict()))
    ref.save_pretrained(tmp_path / "transformer")
    torch.testing.assert_close(_probe(load_dit(tmp_path)), _probe(tiny), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_load_in_requested_dtype(tiny, tmp_path, dtype):
    path = save_dit(tiny, tmp_path / "m.safetensors", layout="nvlabs", dtype=torch.float16)
    model = load_dit(path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_fp8_storage_upcasts(tiny, tmp_path):
    path = save_dit(tiny, tmp_path / "m.safetensors", layout="nvlabs", dtype=torch.float8_e4m3fn)
    model = load_dit(path)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("cfg,variant", [
    (replace(TINY, qk_norm=True), "qk"), (replace(TINY, qk_norm=True, guidance_embed=True), "sprint")])
def test_qk_norm_and_sprint_detected(tmp_path, cfg, variant):
    model = randomize_(SanaDiT(cfg), seed=8).eval()
    for layout, path in (("nvlabs", tmp_path / "a.pth"), ("diffusers", tmp_path / "folder")):
        loaded = load_dit(save_dit(model, path, layout=layout))
        assert loaded.cfg.qk_norm and loaded.cfg.guidance_embed == cfg.guidance_embed
        torch.testing.assert_close(_probe(loaded), _probe(model), rtol=0, atol=0)


def test_pos_embed_from_name_config_and_override(tiny, tmp_path):
    d = tmp_path / "Sana_1600M_4Kpx_BF16" / "checkpoints"
    d.mkdir(parents=True)
    path = save_dit(tiny, d / "Sana_1600M_4Kpx_BF16.pth", layout="nvlabs")
    cfg = load_dit(path).cfg
    assert (cfg.use_pe, cfg.pe_interpolation, cfg.base_size) == (True, 2.0, 128)
    assert not load_dit(path, use_pe=False).cfg.use_pe
    pe = replace(TINY, use_pe=True, pe_interpolation=1.0, base_size=64)
    folder = save_dit(randomize_(SanaDiT(pe)), tmp_path / "plain_name")
    assert json.loads((folder / "config.json").read_text())["interpolation_scale"] == 1.0
    assert load_dit(folder).cfg == pe
    assert not load_dit(save_dit(tiny, tmp_path / "Sana_600M_1024px.pth", layout="nvlabs")).cfg.use_pe


def test_real_sizes_detect_and_count_like_diffusers():
    """Every released variant built on meta: parameter counts equal diffusers' and detection round-trips."""
    from sana_core.checkpoints.dit import detect_config, diffusers_config

    expected = {"sana-0.6b": 0.59e9, "sana-1.6b": 1.6e9, "sana-1.5-4.8b": 4.7e9}
    for name, cfg in VARIANTS.items():
        with torch.device("meta"):
            ours = SanaDiT(cfg)
            dc = diffusers_config(cfg)
            ref = SanaTransformer2DModel(**{k: v for k, v in dc.items() if not k.startswith("_")})
        n = sum(p.numel() for p in ours.parameters())
        assert n == sum(p.numel() for p in ref.parameters()), name
        if name in expected:
            assert abs(n - expected[name]) / expected[name] < 0.05, (name, n)
        sd = ours.state_dict()
        assert detect_config(sd, diffusers_config=dc) == (name, cfg)


@pytest.mark.parametrize("keys,hint", [
    ({"input_blocks.0.0.weight": (4, 4), "middle_block.0.weight": (4,)}, "UNet"),
    ({"lora_unet_blocks_0.lora_down.weight": (4, 4)}, "LoRA"),
    ({"model.layers.0.self_attn.q_proj.weight": (4, 4)}, "language model"),
    ({"double_blocks.0.img_attn.qkv.weight": (4, 4)}, "Flux"),
])
def test_not_a_sana_dit(tmp_path, keys, hint):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(CheckpointError, match=f"other.safetensors: not a Sana DiT.*{hint}"):
        load_dit(path)


def test_truncated_and_incomplete_files(tiny, tmp_path):
    path = save_dit(tiny, tmp_path / "m.safetensors", layout="nvlabs")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated"):
        load_dit(tmp_path / "cut.safetensors")
    (tmp_path / "cut.pth").write_bytes(save_dit(tiny, tmp_path / "x.pth", layout="nvlabs").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_dit(tmp_path / "cut.pth")
    sd = tiny.state_dict()
    del sd["blocks.1.attn.proj.bias"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "hole.safetensors"))
    with pytest.raises(CheckpointError, match="hole.safetensors.*missing keys.*blocks.1.attn.proj.bias"):
        load_dit(tmp_path / "hole.safetensors")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dit(tmp_path / "nowhere.safetensors")


class _Payload:
    """Unpickling this would create a file: weights_only=True must refuse it."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"state_dict": {"x": _Payload(tmp_path / "PWNED")}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth.*weights_only"):
        load_dit(tmp_path / "evil.pth")
    assert not (tmp_path / "PWNED").exists()


def test_lora_key_map_patches_the_same_weights_as_diffusers(tiny):
    """A diffusers-format LoRA (q/k/v of both attentions, the FFN, the output) merged through our key map (with
    offsets into the fused qkv / kv) gives the same model as the LoRA merged into diffusers' split weights."""
    from diffusers import SanaTransformer2DModel

    from sana_core.checkpoints.dit import diffusers_config, lora_key_map, nvlabs_to_diffusers

    g = torch.Generator().manual_seed(3)
    targets = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k", "transformer_blocks.1.attn1.to_v",
               "transformer_blocks.1.attn2.to_k", "transformer_blocks.1.attn2.to_v", "transformer_blocks.0.attn2.to_q",
               "transformer_blocks.0.ff.conv_inverted", "proj_out"]
    ref = SanaTransformer2DModel(**{k: v for k, v in diffusers_config(TINY).items() if not k.startswith("_")})
    ref.load_state_dict(nvlabs_to_diffusers(tiny.state_dict()))
    ref_sd, key_map = ref.state_dict(), lora_key_map(TINY, prefix="")
    ours_sd = {k: v.clone() for k, v in tiny.state_dict().items()}  # the fixture model stays untouched
    for name in targets:
        weight = ref_sd[name + ".weight"]
        delta = torch.randn(weight.shape[0], 4, generator=g) @ torch.randn(4, weight[0].numel(), generator=g) * 0.05
        ref_sd[name + ".weight"] = weight + delta.reshape(weight.shape)
        target = key_map[f"transformer.{name}"]
        key, (dim, start, rows) = target if isinstance(target, tuple) else (target, (0, 0, ours_sd[target].shape[0]))
        ours_sd[key].narrow(dim, start, rows).add_(delta.reshape(rows, *ours_sd[key].shape[1:]))
    ref.load_state_dict(ref_sd)
    ours = SanaDiT(TINY)
    ours.load_state_dict(ours_sd)
    x = torch.randn(2, 32, 3, 5, generator=g)
    ctx = torch.randn(2, 6, 48, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, torch.tensor([700.0, 20.0]), ctx),
                                   ref(x, encoder_hidden_states=ctx, timestep=torch.tensor([700.0, 20.0])).sample,
                                   rtol=1e-5, atol=1e-5)
    assert key_map["lora_unet_transformer_blocks_0_attn1_to_k"] == ("blocks.0.attn.qkv.weight", (0, 64, 64))
    assert key_map["blocks.0.attn.qkv"] == "blocks.0.attn.qkv.weight"
    comfy_names = lora_key_map(TINY)  # ComfyUI's trainer keys its LoRAs by the BaseModel's module paths
    assert comfy_names["diffusion_model.blocks.1.cross_attn.kv_linear"] == "diffusion_model.blocks.1.cross_attn.kv_linear.weight"
