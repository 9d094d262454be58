"""Sana ControlNet in NVlabs' order (the released HED files): the engine's forward against a reference written
straight from NVlabs' pseudo-code, and the identities (zero after_proj = the base model exactly; strength 0 too;
two ControlNets at half strength on one hint = one at full strength); real sizes on meta."""
from dataclasses import replace

import pytest
import torch

from sana_core.controlnet import Control, SanaControlNet
from sana_core.dit import VARIANTS, DiTConfig, SanaDiT

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
    y = dit.embed_text(ctx)
    bias = ((1 - mask.float()) * -10000.0)[:, None, None, :]
    blocks, copies = dit.blocks, net.controlnet
    tokens = blocks[0](tokens, blocks[0].cross_attn.kv(y), t6, bias, (H, W))
    ci = None
    for i in range(1, len(copies) + 1):
        copy = copies[i - 1]
        inp = tokens + copies[0].before_proj(c) if i == 1 else ci
        ci = copy.copied_block(inp, copy.copied_block.cross_attn.kv(y), t6, bias, (H, W))
        skip = copy.after_proj(ci) * scale
        tokens = blocks[i](tokens + skip, blocks[i].cross_attn.kv(y), t6, bias, (H, W))
    for block in blocks[len(copies) + 1:]:
        tokens = block(tokens, block.cross_attn.kv(y), t6, bias, (H, W))
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


def test_identities(models):
    dit, net = models
    x, hint, t, ctx, mask = _inputs(3)
    silent = _random(SanaControlNet(CFG), 1)
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


def test_mismatches_are_errors(models):
    dit, net = models
    x, hint, t, ctx, mask = _inputs()
    wide = SanaControlNet(replace(CFG, width=96, cross_heads=3))
    with torch.no_grad():
        with pytest.raises(ValueError, match="ControlNet of width 96 cannot drive this DiT of width 64"):
            dit(x, t, ctx, mask, controls=[Control(wide, hint)])
        with pytest.raises(ValueError, match="does not match the latent"):
            dit(x, t, ctx, mask, controls=[Control(net, hint[..., :2, :4])])
        with pytest.raises(ValueError, match="need the caption"):
            dit(x, t, None, mask, text_kv=dit.text_kv(ctx), controls=[Control(net, hint)])


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
