"""The training objective against diffusers' training utilities and NVlabs' formulas (fp32, CPU)."""
import math

import pytest
import torch

from sana_core.checkpoints.dit import load_dit, save_dit
from sana_core.dit import SanaDiT
from sana_core.samplers import shift_sigmas
from sana_core.tiny import randomize_, tiny_dit_config
from sana_core.train.recipe import (drop_captions, flow_loss, loss_weighting, noised, sample_u, sigmas_from_u)

DIFFUSERS_DENSITY = {"logit_normal": "logit_normal", "mode": "mode", "uniform": "none"}


@pytest.mark.parametrize("density", list(DIFFUSERS_DENSITY))
def test_density_draws_equal_diffusers(density):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    kw = dict(logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    want = compute_density_for_timestep_sampling(DIFFUSERS_DENSITY[density], 64,
                                                 generator=torch.Generator().manual_seed(7), **kw)
    got = sample_u(density, 64, torch.Generator().manual_seed(7), **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_logit_normal_density_statistics():
    """Kolmogorov-Smirnov: the logits of 20000 draws against N(0, 1); D must stay under 1.63 / sqrt(n) (the 1%
    critical value), and the sigma table is NVlabs' shift(int(1000 u) / 1000)."""
    n = 20000
    u = sample_u("logit_normal", n, torch.Generator().manual_seed(0)).double()
    z, _ = torch.sort(torch.log(u / (1 - u)))
    cdf = torch.special.ndtr(z)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert d < 1.63 / math.sqrt(n), d
    sig = sigmas_from_u(u.float(), 3.0)
    want = shift_sigmas(torch.floor(u.float() * 1000).double() / 1000, 3.0).float()
    torch.testing.assert_close(sig, want, rtol=0, atol=0)
    assert 0 <= sig.min() and sig.max() < 1


@pytest.mark.parametrize("scheme,theirs", [("none", "logit_normal"), ("sigma_sqrt", "sigma_sqrt"),
                                           ("cosmap", "cosmap")])
def test_weighting_equals_diffusers(scheme, theirs):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    s = torch.rand(16, generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01
    torch.testing.assert_close(loss_weighting(scheme, s), compute_loss_weighting_for_sd3(theirs, s).float())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Our tiny DiT and diffusers' SanaTransformer2DModel with the same weights (written in the diffusers layout)."""
    from diffusers import SanaTransformer2DModel

    folder = tmp_path_factory.mktemp("dit")
    save_dit(randomize_(SanaDiT(tiny_dit_config()), seed=4), folder)
    return load_dit(folder, dtype=torch.float32), SanaTransformer2DModel.from_pretrained(folder).float().eval()


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_equals_diffusers_formula(models, weighting):
    """Fixed batch, noise and timesteps: our loss = diffusers' DreamBooth formula (flow target noise - x0,
    `compute_loss_weighting_for_sd3`, mean over elements then batch) computed with their transformer."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    ours, theirs = models
    g = torch.Generator().manual_seed(3)
    B, T = 3, 12
    x0, noise = torch.randn(B, 32, 4, 6, generator=g), torch.randn(B, 32, 4, 6, generator=g)
    context = torch.randn(B, T, 64, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0
    sigmas = sigmas_from_u(sample_u("logit_normal", B, g), 3.0)
    got = flow_loss(ours, x0, noise, sigmas, context, mask, weighting).mean()

    s = sigmas.reshape(-1, 1, 1, 1)
    pred = theirs(hidden_states=(1.0 - s) * x0 + s * noise, encoder_hidden_states=context,
                  encoder_attention_mask=mask, timestep=torch.floor(sigmas.double() * 1000).float(),
                  return_dict=False)[0]
    w = compute_loss_weighting_for_sd3({"none": "logit_normal"}.get(weighting, weighting), s)
    want = torch.mean((w.float() * (pred.float() - (noise - x0).float()) ** 2).reshape(B, -1), 1).mean()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


def test_loss_needs_a_sana_dit():
    with pytest.raises(TypeError, match="SanaDiT"):
        flow_loss(torch.nn.Identity(), *(torch.zeros(1, 32, 2, 2),) * 2, torch.zeros(1), torch.zeros(1, 3, 64),
                  torch.ones(1, 3))


def test_noised_and_caption_dropout():
    x0, noise = torch.ones(2, 1, 1, 1), torch.full((2, 1, 1, 1), 3.0)
    assert noised(x0, noise, torch.tensor([0.0, 0.25])).flatten().tolist() == [1.0, 1.5]
    embeds, mask = torch.ones(3, 4, 2), torch.tensor([[1, 1, 0, 0]] * 3)
    null, null_mask = torch.full((4, 2), 7.0), torch.tensor([1, 0, 0, 0])
    drop = torch.tensor([False, True, False])
    e, m = drop_captions(embeds, mask, drop, null, None)         # NVlabs: the sample keeps its mask
    assert e[1].eq(7).all() and e[0].eq(1).all() and m.equal(mask)
    e, m = drop_captions(embeds, mask, drop, null, null_mask)    # the empty prompt with its own mask
    assert m[1].tolist() == [1, 0, 0, 0] and m[2].tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="density"):
        sample_u("gaussian", 2)
    with pytest.raises(ValueError, match="weighting"):
        loss_weighting("snr", torch.ones(2))
