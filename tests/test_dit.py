"""The linear DiT against diffusers' SanaTransformer2DModel on the same random weights (fp32)."""
from dataclasses import replace

import pytest
import torch
from diffusers import SanaTransformer2DModel

from sana_core.checkpoints.dit import nvlabs_to_diffusers
from sana_core.dit import DiTConfig, SanaDiT, relu_linear_attention, sincos_pos_embed
from sana_core.tiny import randomize_

TINY = DiTConfig(depth=2, width=64, cross_heads=2, caption_channels=48)
RTOL, ATOL = 1e-5, 1e-5


def diffusers_twin(ours: SanaDiT) -> SanaTransformer2DModel:
    c = ours.cfg
    ref = SanaTransformer2DModel(
        in_channels=c.in_channels, out_channels=c.in_channels, num_attention_heads=c.self_heads,
        attention_head_dim=c.self_head_dim, num_layers=c.depth, num_cross_attention_heads=c.cross_heads,
        cross_attention_head_dim=c.width // c.cross_heads, cross_attention_dim=c.width,
        caption_channels=c.caption_channels, mlp_ratio=c.mlp_ratio, sample_size=c.base_size,
        interpolation_scale=c.pe_interpolation if c.use_pe else None, guidance_embeds=c.guidance_embed,
        qk_norm="rms_norm_across_heads" if c.qk_norm else None)
    ref.load_state_dict(nvlabs_to_diffusers(ours.state_dict()), strict=True)
    return ref.eval()


def inputs(cfg: DiTConfig, B=3, H=4, W=6, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    ctx = torch.randn(B, T, cfg.caption_channels, generator=g)
    mask = torch.zeros(B, T, dtype=torch.int64)
    for b, n in enumerate([T, 2, 5][:B]):  # a different caption length per sample
        mask[b, :n] = 1
    t = torch.tensor([999.0, 500.0, 3.0][:B])
    return x, t, ctx, mask


@pytest.mark.parametrize("variant", ["base", "qk_norm", "sprint", "pe"])
def test_forward_matches_diffusers(variant):
    cfg = {"base": TINY, "qk_norm": replace(TINY, qk_norm=True),
           "sprint": replace(TINY, qk_norm=True, guidance_embed=True),
           "pe": replace(TINY, use_pe=True, pe_interpolation=2.0, base_size=4)}[variant]
    ours = randomize_(SanaDiT(cfg), seed=3).eval()
    ref = diffusers_twin(ours)
    x, t, ctx, mask = inputs(cfg)
    extra = {}
    if cfg.guidance_embed:
        extra["guidance"] = torch.tensor([4.5, 3.0, 1.0])
    with torch.no_grad():
        got = ours(x, t, ctx, mask, **extra)
        want = ref(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask, **extra).sample
    assert got.shape == (3, 32, 4, 6)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_batch_masks_are_per_sample():
    """Each sample's output depends only on its own real tokens: padding values do not leak in."""
    ours = randomize_(SanaDiT(TINY), seed=4).eval()
    x, t, ctx, mask = inputs(TINY)
    noisy = ctx.clone()
    noisy[mask == 0] = 1e3 * torch.randn_like(noisy[mask == 0])
    with torch.no_grad():
        a, b = ours(x, t, ctx, mask), ours(x, t, noisy, mask)
        alone = ours(x[1:2], t[1:2], ctx[1:2, :2], mask[1:2, :2])  # sample 1 with only its 2 real tokens
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(a[1:2], alone, rtol=RTOL, atol=ATOL)


def test_linear_attention_matches_quadratic_form():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g, dtype=torch.float64) for _ in range(3))
    rq, rk = q.relu(), k.relu()
    w = rq @ rk.mT                                                      # (B, h, N, N) unnormalised
    want = (w / w.sum(-1, keepdim=True)) @ v.float().double()
    for layout in (lambda t: t, lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)):  # any strides
        qq, kk, vv = (layout(t.clone()) for t in (q, k, v))
        got = relu_linear_attention(qq, kk, vv)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        assert got.dtype == torch.float32 and torch.equal(qq, q) and torch.equal(kk, k)  # inputs untouched
    q32 = q.float()
    relu_linear_attention(q32, q32, q32)
    assert torch.equal(q32, q.float())  # fp32 contiguous inputs are not ReLU'd in place


def test_linear_attention_accumulates_in_fp32():
    q = k = torch.full((1, 1, 4096, 32), 8.0, dtype=torch.float16)  # sums overflow fp16 (max 65504)
    v = torch.ones(1, 1, 4096, 32, dtype=torch.float16)
    out = relu_linear_attention(q, k, v)
    assert torch.isfinite(out).all() and torch.allclose(out, torch.ones_like(out))


def test_pag_identity_layers_match_diffusers_processor():
    """Identity self-attention (PAG) on chosen blocks equals diffusers' PAG processor's perturbed path."""
    from diffusers.models.attention_processor import PAGIdentitySanaLinearAttnProcessor2_0

    ours = randomize_(SanaDiT(TINY), seed=5).eval()
    ref = diffusers_twin(ours)
    ref.transformer_blocks[1].attn1.set_processor(PAGIdentitySanaLinearAttnProcessor2_0())
    x, t, ctx, mask = inputs(TINY, B=2)
    x, t, ctx, mask = (v.repeat(2, *[1] * (v.ndim - 1)) for v in (x, t, ctx, mask))  # [cond | perturbed]
    with torch.no_grad():
        got = ours(x, t, ctx, mask, pag_layers=[1], pag_batch=torch.tensor([False, False, True, True]))
        want = ref(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask).sample
        # diffusers adds -10000 to every score of the all-padding caption, which costs fp32 precision: the same
        # math without the bias is the reference there
        want[2] = ref(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask.clamp(min=1)).sample[2]
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(got[:2], got[2:], atol=1e-3)  # the perturbed half really differs


def test_sincos_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for h, w, base, interp in [(4, 6, 4, 2.0), (8, 8, 64, 1.0), (5, 3, 128, 2.0)]:
        want = get_2d_sincos_pos_embed(64, (h, w), base_size=base, interpolation_scale=interp, output_type="pt")
        torch.testing.assert_close(sincos_pos_embed(64, h, w, base, interp), want.float(), rtol=1e-6, atol=1e-6)


def test_bf16_forward_close_to_fp32():
    ours = randomize_(SanaDiT(TINY), seed=6).eval()
    x, t, ctx, mask = inputs(TINY)
    with torch.no_grad():
        ref = ours(x, t, ctx, mask)
        got = ours.to(torch.bfloat16)(x, t, ctx, mask)
    assert got.dtype == torch.float32  # returned in the input's dtype
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_sprint_needs_guidance():
    ours = randomize_(SanaDiT(replace(TINY, qk_norm=True, guidance_embed=True))).eval()
    x, t, ctx, mask = inputs(TINY)
    with pytest.raises(ValueError, match="guidance"):
        ours(x, t, ctx, mask)


def test_real_size_06b_bf16_forward_matches_diffusers():
    """The real 0.6B block (width 1152, its heads and MLP), four of them, random weights, bf16 on CPU: ours and
    diffusers agree, and our bf16 error against an fp32 reference is no larger than diffusers' own. (Four blocks,
    not 28: bf16 matmuls are emulated on this CPU; the rounding checked is per layer.)"""
    from sana_core.dit import VARIANTS

    cfg = replace(VARIANTS["sana-0.6b"], depth=4)
    ours = randomize_(SanaDiT(cfg, dtype=torch.bfloat16), seed=9).eval()
    ref = diffusers_twin(ours).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 8, 8, generator=g)  # a 256px image
    ctx = torch.randn(2, 100, 2304, generator=g)  # 100 caption rows (300 in use): the K/V projections dominate
    mask = torch.zeros(2, 100, dtype=torch.int64)
    mask[0, :40], mask[1, :100] = 1, 1
    t = torch.tensor([999.0, 250.0])
    with torch.no_grad():
        got = ours(x, t, ctx, mask).float()
        want = ref(x.bfloat16(), encoder_hidden_states=ctx.bfloat16(), timestep=t, encoder_attention_mask=mask).sample.float()
        exact = ours.float()(x, t, ctx, mask)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(got, want) < 2e-2, rel(got, want)
    assert rel(got, exact) <= 1.1 * rel(want, exact), (rel(got, exact), rel(want, exact))


def test_layers_come_from_injected_ops(recording_ops):
    """Every Linear/Conv2d is built by `ops` (ComfyUI passes comfy.ops for casting and partial offload)."""
    ops, made = recording_ops
    model = SanaDiT(replace(TINY, qk_norm=True, guidance_embed=True), ops=ops)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert layers and all(any(m is n for n in made) for m in layers)
    assert not list(model.buffers())  # nothing left on meta after an assign-load


def test_caption_attention_matches_diffusers_masks_with_holes_repeats_and_batches():
    """Each caption attends to its real tokens only, projected once per distinct caption (`caption_kv`): the
    same as diffusers' padded batch with the mask as a bias, for masks with holes (ConditioningConcat: two
    prompts, each followed by its padding), a caption repeated in the batch (CFG's negative) and an all-padding
    mask (every row biased alike: all rows attended); precomputed keys/values equal the forward's own, and a
    sample alone gives its output in a batch of other captions."""
    ours = randomize_(SanaDiT(TINY), seed=6).eval()
    ref = diffusers_twin(ours)
    x, t, ctx, _ = inputs(TINY, B=4, H=4, W=4, T=8)
    x[3], ctx[3] = x[1], ctx[1]
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0],   # holes
                         [1, 1, 1, 0, 0, 0, 0, 0],
                         [0, 0, 0, 0, 0, 0, 0, 0],   # nothing real: the bias shifts every row alike
                         [1, 1, 1, 0, 0, 0, 0, 0]])  # sample 1's caption again
    t = torch.tensor([999.0, 500.0, 3.0, 500.0])
    kv = ours.text_kv(ctx, mask)[0]
    assert kv.rows == [slice(0, 1), [1, 3], slice(2, 3)] and [k.shape[:3] for k in kv.keys] == [
        (1, 2, 5), (2, 2, 3), (1, 2, 8)]
    with torch.no_grad():
        got = ours(x, t, ctx, mask)
        cached = ours(x, t, None, mask, text_kv=ours.text_kv(ctx, mask))
        want = ref(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask).sample
        # diffusers adds -10000 to every score of the all-padding caption, which costs fp32 precision: the same
        # math without the bias is the reference there
        want[2] = ref(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask.clamp(min=1)).sample[2]
        alone = ours(x[1:2], t[1:2], ctx[1:2], mask[1:2])
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert torch.equal(cached, got)
    torch.testing.assert_close(got[3], got[1], rtol=0, atol=0)  # one projection for the repeated caption
    torch.testing.assert_close(alone[0], got[1], rtol=RTOL, atol=ATOL)
