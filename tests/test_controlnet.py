"""Sana ControlNet in NVlabs' order (the released HED files): the engine's forward against a reference written
straight from NVlabs' pseudo-code, and the identities (zero after_proj = the base model exactly; strength 0 too;
two ControlNets at half strength on one hint = one at full strength); real sizes on meta."""
from dataclasses import replace

import pytest
import torch

from sana_core.controlnet import Control, SanaControlNet
from sana_core.dit import VARIANTS, DiTConfig, SanaDiT, caption_kv

CFG = DiTConfig(depth=9, width=64, cross_heads=2, caption_channels=48)


def _random(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    return module.eval()


@pytest.fixture(scope="module")
def models():
    return _random(SanaDiT(CFG), 0), _random(SanaControlNet(CFG), 1)


def _inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x, hint = torch.randn(2, 32, 3, 5, generator=g), torch.randn(1, 32, 3, 5, generator=g)
    ctx, mask = torch.randn(2, 6, 48, generator=g), torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return x, hint, torch.tensor([700.0, 30.0]), ctx, mask


def reference(dit: SanaDiT, net: SanaControlNet, x, hint, t, ctx, mask, scale=1.0):
    """NVlabs' SanaMSControlNet forward, from its pseudo-code, on our modules."""
    B, _, H, W = x.shape
    tokens = dit.x_embedder.proj(x).flatten(2).mT
    c = dit.x_embedder.proj(hint.expand(B, -1, -1, -1)).flatten(2).mT
    t0 = dit.t_embedder(t, x.dtype)
    t6 = dit.t_block(t0).unflatten(1, (6, -1))
    t6[:, 1::3] += 1
    kv = lambda block: caption_kv([block.cross_attn], dit.embed_text, ctx, mask)[0]  # noqa: E731 (test_dit checks it)
    blocks, copies = dit.blocks, net.controlnet
    tokens = blocks[0](tokens, kv(blocks[0]), t6, (H, W))
    ci = None
    for i in range(1, len(copies) + 1):
        copy = copies[i - 1]
        inp = tokens + copies[0].before_proj(c) if i == 1 else ci
        ci = copy.copied_block(inp, kv(copy.copied_block), t6, (H, W))
        skip = copy.after_proj(ci) * scale
        tokens = blocks[i](tokens + skip, kv(blocks[i]), t6, (H, W))
    for block in blocks[len(copies) + 1:]:
        tokens = block(tokens, kv(block), t6, (H, W))
    out = dit.final_layer(tokens, t0)
    return out.reshape(B, H, W, 1, 1, -1).permute(0, 5, 1, 3, 2, 4).reshape(B, -1, H, W)


def test_forward_follows_nvlabs_order(models):
    dit, net = models
    x, hint, t, ctx, mask = _inputs()
    with torch.no_grad():
        got = dit(x, t, ctx, mask, controls=[Control(net, hint, 0.7)])
        want = reference(dit, net, x, hint, t, ctx, mask, 0.7)
        base = dit(x, t, ctx, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-2  # the control acts


@pytest.mark.parametrize("order", ["nvlabs", "diffusers"])
def test_identities(models, order):
    """For both orders: zero after_proj = the base model exactly; strength 0 too; two ControlNets at half
    strength on one hint = one at full strength."""
    dit = models[0]
    x, hint, t, ctx, mask = _inputs(3)
    net, silent = (_random(SanaControlNet(CFG, order), 1) for _ in range(2))
    for block in silent.controlnet:
        torch.nn.init.zeros_(block.after_proj.weight)
        torch.nn.init.zeros_(block.after_proj.bias)
    with torch.no_grad():
        base = dit(x, t, ctx, mask)
        assert torch.equal(dit(x, t, ctx, mask, controls=[Control(silent, hint)]), base)
        assert torch.equal(dit(x, t, ctx, mask, controls=[Control(net, hint, 0.0)]), base)
        one = dit(x, t, ctx, mask, controls=[Control(net, hint, 1.0)])
        two = dit(x, t, ctx, mask, controls=[Control(net, hint, 0.5), Control(net, hint, 0.5)])
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)
    assert (one - base).abs().max() > 1e-2


def test_float16_overflow_widens_the_dit_and_its_controlnets(models):
    """The sampler's float16 fallback converts the DiT and every ControlNet together, then redoes the step."""
    from sana_core.denoiser import SanaDenoiser, TextCondition
    dit = _random(SanaDiT(CFG), 0)
    with torch.no_grad():
        dit.final_layer.linear.weight.mul_(1e5)  # finite weights whose output overflows float16 (65504)
    dit.half()
    net = _random(SanaControlNet(CFG), 1).half()
    x, hint, _, ctx, mask = _inputs()
    denoiser = SanaDenoiser(dit, TextCondition(ctx, mask), guidance_scale=1.0, controls=[Control(net, hint)])
    out = denoiser(x, torch.tensor(0.5))
    assert dit.dtype == torch.bfloat16 and net.compute_dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_mismatches_are_errors(models):
    dit, net = models
    x, hint, t, ctx, mask = _inputs()
    wide = SanaControlNet(replace(CFG, width=96, cross_heads=3))
    with torch.no_grad():
        with pytest.raises(ValueError, match="ControlNet of width 96 cannot drive this DiT of width 64"):
            dit(x, t, ctx, mask, controls=[Control(wide, hint)])
        with pytest.raises(ValueError, match="does not match the latent"):
            dit(x, t, ctx, mask, controls=[Control(net, hint[..., :2, :4])])
        with pytest.raises(ValueError, match=r"\(MLP ratio, q/k norm\) \(2.5, True\) cannot drive this DiT with "
                                             r"\(2.5, False\)"):
            SanaControlNet(replace(CFG, qk_norm=True)).check_base(CFG)
        with pytest.raises(ValueError, match=r"diffusers order\) adds to base blocks up to 7, but the DiT has 7"):
            SanaControlNet(CFG, "diffusers").check_base(replace(CFG, depth=7))
        with pytest.raises(ValueError, match="needs the caption"):
            dit(x, t, None, mask, text_kv=dit.text_kv(ctx, mask), controls=[Control(net, hint)])


@pytest.mark.parametrize("variant", ["sana-0.6b", "sana-1.6b"])
def test_real_size_branch_on_meta(variant):
    """The branch of the released 0.6B / 1.6B HED files: 7 copied base blocks and 8 width x width projections."""
    cfg = VARIANTS[variant]
    with torch.device("meta"):
        net, dit = SanaControlNet(cfg), SanaDiT(cfg)
    block = sum(p.numel() for p in dit.blocks[0].parameters())
    assert sum(p.numel() for p in net.parameters()) == 7 * block + 8 * (cfg.width**2 + cfg.width)
    assert [k for k in net.state_dict() if not k.startswith("controlnet.0.")][:1] == ["controlnet.1.copied_block.scale_shift_table"]
    assert "controlnet.0.before_proj.weight" in net.state_dict()


# ---- diffusers order: SanaControlNetModel + SanaTransformer2DModel(controlnet_block_samples=...) ----

def diffusers_controlnet(cfg: DiTConfig, seed: int, depth: int = 7):
    from diffusers import SanaControlNetModel

    from sana_core.tiny import randomize_
    ref = SanaControlNetModel(
        in_channels=cfg.in_channels, out_channels=cfg.in_channels, num_attention_heads=cfg.self_heads,
        attention_head_dim=cfg.self_head_dim, num_layers=depth, num_cross_attention_heads=cfg.cross_heads,
        cross_attention_head_dim=cfg.width // cfg.cross_heads, cross_attention_dim=cfg.width,
        caption_channels=cfg.caption_channels, mlp_ratio=cfg.mlp_ratio, sample_size=cfg.base_size)
    return randomize_(ref, seed).eval()


def test_diffusers_order_matches_diffusers(tmp_path):
    """A diffusers ControlNet folder, loaded by our loader, on our DiT = diffusers' ControlNet + transformer."""
    from test_dit import diffusers_twin, inputs

    from sana_core.checkpoints.controlnet import load_controlnet
    from sana_core.tiny import randomize_
    dit = randomize_(SanaDiT(CFG), 5).eval()
    ref_dit, ref_net = diffusers_twin(dit), diffusers_controlnet(CFG, 6)
    ref_net.save_pretrained(tmp_path / "cn")
    net = load_controlnet(tmp_path / "cn", base=CFG)
    assert net.order == "diffusers" and len(net.controlnet) == 7
    x, t, ctx, mask = inputs(CFG)
    hint = torch.randn(1, 32, 4, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = dit(x, t, ctx, mask, controls=[Control(net, hint, 0.8)])
        samples = ref_net(x, encoder_hidden_states=ctx, timestep=t, controlnet_cond=hint.expand(3, -1, -1, -1),
                          conditioning_scale=0.8, encoder_attention_mask=mask, return_dict=False)[0]
        want = ref_dit(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask,
                       controlnet_block_samples=tuple(samples)).sample
        base = dit(x, t, ctx, mask)
        # cached text keys/values (as the sampler passes them) give the same result
        cached = dit(x, t, None, mask, text_kv=dit.text_kv(ctx, mask),
                     controls=[Control(net, hint, 0.8, text_kv=net.text_kv(ctx, dit, mask))])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, got, rtol=1e-6, atol=1e-6)
    assert (got - base).abs().max() > 1e-2


# ---- loading: every layout, only what is needed, strict, in the dtype asked, clear errors ----

def _nvlabs(sd: dict) -> dict:
    """Our keys -> NVlabs' file layout (the Mix-FFN's 1x1 convs as (out, in, 1, 1) kernels)."""
    from sana_core.checkpoints.dit import pointwise_kernels
    return pointwise_kernels({k: v.clone() for k, v in sd.items()}, 4)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def test_loading_layouts(models, tmp_path):
    from safetensors.torch import save_file

    from sana_core.checkpoints.controlnet import load_controlnet
    from sana_core.checkpoints.dit import load_dit
    dit, net = models
    combined = tmp_path / "Sana_600M_1024px_ControlNet_HED.pth"
    torch.save({"state_dict": {**_nvlabs(dit.state_dict()), **_nvlabs(net.state_dict())}}, combined)
    # the combined file is the DiT and the ControlNet, each reading only its own tensors
    base, branch = load_dit(combined), load_controlnet(combined, base=dit.cfg)
    assert _same(base, dit) and _same(branch, net) and branch.order == "nvlabs"
    assert not any(k.startswith(("blocks.", "x_embedder", "final_layer")) for k in branch.state_dict())
    # the branch alone, as a (prefixed) safetensors file; loaded on meta then assigned, in the dtype asked
    alone = tmp_path / "branch.safetensors"
    save_file({"model." + k: v for k, v in _nvlabs(net.state_dict()).items()}, alone)
    half = load_controlnet(alone, base=dit.cfg, dtype=torch.bfloat16)
    assert _same(half, net) and all(p.dtype == torch.bfloat16 for p in half.parameters())  # = the bf16 cast
    assert _same(load_controlnet(alone, base=dit.cfg), net)
    # a diffusers ControlNet as one safetensors file (no config.json: read from the weights)
    ref = diffusers_controlnet(CFG, 8)
    single = tmp_path / "diffusers_controlnet.safetensors"
    save_file(ref.state_dict(), single)
    got = load_controlnet(single, base=CFG)
    assert got.order == "diffusers" and got.first_block == 1 and sum(p.numel() for p in got.parameters()) == \
        sum(p.numel() for p in ref.parameters())


def test_loading_errors(models, tmp_path):
    from safetensors.torch import save_file

    from sana_core.checkpoints.controlnet import load_controlnet
    from sana_core.checkpoints.dit import load_dit
    from sana_core.checkpoints.files import CheckpointError
    dit, net = models
    sd_controlnet = tmp_path / "control_v11p_sd15_scribble.safetensors"
    save_file({"input_hint_block.0.weight": torch.zeros(16, 3, 3, 3), "zero_convs.0.0.weight": torch.zeros(4, 4)},
              sd_controlnet)
    with pytest.raises(CheckpointError, match="control_v11p_sd15_scribble.*not a Sana ControlNet.*Stable Diffusion "
                                              "ControlNet"):
        load_controlnet(sd_controlnet, base=CFG)
    dit_only = tmp_path / "dit.safetensors"
    save_file(_nvlabs(dit.state_dict()), dit_only)
    with pytest.raises(CheckpointError, match="dit.safetensors: not a Sana ControlNet.*diffusion transformer"):
        load_controlnet(dit_only, base=CFG)
    wide = tmp_path / "wide.safetensors"
    save_file(_nvlabs(_random(SanaControlNet(replace(CFG, width=96, cross_heads=3)), 1).state_dict()), wide)
    with pytest.raises(CheckpointError, match="wide.safetensors: this ControlNet was made for a Sana DiT with "
                                              "\\{'width': 96"):
        load_controlnet(wide, base=CFG)
    branch = tmp_path / "branch.safetensors"
    save_file(_nvlabs(net.state_dict()), branch)
    with pytest.raises(CheckpointError, match="branch.safetensors: no Sana DiT weights"):
        load_dit(branch)
    diffusers_folder = tmp_path / "cn"
    diffusers_controlnet(CFG, 8).save_pretrained(diffusers_folder)
    with pytest.raises(CheckpointError, match="diffusers Sana ControlNet, not a DiT"):
        load_dit(diffusers_folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="width 64, the DiT it should drive 96"):
        load_controlnet(diffusers_folder, base=replace(CFG, width=96, cross_heads=3))
    truncated = tmp_path / "truncated.safetensors"
    save_file({k: v for k, v in _nvlabs(net.state_dict()).items() if not k.startswith("controlnet.6.")}
              | {"controlnet.6.after_proj.weight": torch.zeros(64, 64)}, truncated)
    with pytest.raises(CheckpointError, match="truncated.safetensors: weights do not fit.*missing"):
        load_controlnet(truncated, base=CFG)


def test_hed_release_repo_ids_fetch_their_pth(monkeypatch, tmp_path):
    """NVlabs' HED repos hold one .pth (no diffusers folder): their repo id fetches that file only."""
    import huggingface_hub

    from sana_core import hub
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, file: calls.append((repo, file)) or str(tmp_path / "x.pth"))
    for repo, file in hub.SINGLE_FILE_REPOS.items():
        assert hub.resolve(repo) == tmp_path / "x.pth" and calls[-1] == (repo, file)
    assert len(calls) == 2 and all(f.endswith("_ControlNet_HED.pth") for _, f in calls)
