"""Schedules, samplers and guidance vs diffusers (DPMSolverMultistep / FlowMatchEuler / SCM schedulers and the
Sana, Sana-Sprint and PAG pipelines), on toy velocity models and a tiny random SanaTransformer2DModel.

Tolerances (float32 throughout): schedules and DiT timesteps are compared bit for bit; solver trajectories to
``ATOL`` = 2e-6 absolute on latents of unit scale (the observed differences are float32 rounding, below 1e-6).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaPipeline,
    SanaSprintPipeline,
    SanaTransformer2DModel,
    SCMScheduler,
)
from diffusers.pipelines.pag.pag_utils import PAGMixin

from sana_core import samplers as S

ATOL = 2e-6
SHAPE = (2, 4, 3, 5)  # (B, C, H, W)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


class ToyVelocity:
    """A fixed random velocity field v(x, t): channel mixing + a timestep-dependent bias, so a wrong timestep
    (e.g. a missed int64 truncation) changes the output."""

    def __init__(self, channels: int = SHAPE[1], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels, channels, generator=g) * 0.4
        self.b = torch.randn(1, channels, 1, 1, generator=g)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("oc,bchw->bohw", self.w, x)
        return torch.tanh(mixed) + torch.cos(t.reshape(-1, 1, 1, 1) / 7.0) * self.b


def _flow_model(v_fn: ToyVelocity, truncate: bool):
    """Our side of the contract: model(x, sigma) -> x0, with the DiT timestep from sigma_to_timestep."""

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return S.flow_denoised(x, sigma, v_fn(x, S.sigma_to_timestep(sigma, truncate=truncate)))

    return model


def _noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _run(sampler, model, x, sigmas, **kw):
    """Run one of our samplers, recording the callback dicts."""
    seen: list[dict] = []
    out = sampler(model, x.clone(), sigmas, callback=seen.append, disable=True, **kw)
    return out, seen


def _dpm(shift: float) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(flow_shift=shift, use_flow_sigmas=True, prediction_type="flow_prediction")


# ------------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("shift", [3.0, 6.0])
def test_flow_sigmas_bit_identical_to_dpm_solver(shift):
    sched = _dpm(shift)
    for steps in range(1, 51):
        sched.set_timesteps(steps)
        ours = S.flow_sigmas(steps, shift)
        assert ours.dtype == torch.float32 and ours.shape == (steps + 1,) and ours[-1] == 0
        assert torch.equal(ours, sched.sigmas), steps


@pytest.mark.parametrize("shift", [3.0, 6.0])
def test_truncated_timesteps_equal_dpm_solver_timesteps(shift):
    sched = _dpm(shift)
    for steps in range(1, 301):
        sched.set_timesteps(steps)
        ours = S.sigma_to_timestep(S.flow_sigmas(steps, shift)[:-1], truncate=True)
        assert torch.equal(ours, sched.timesteps.float()), steps
    # diffusers really truncates: the untruncated timesteps differ
    assert not torch.equal(S.sigma_to_timestep(S.flow_sigmas(20, shift)[:-1], truncate=False), sched.timesteps[:20].float())


@pytest.mark.parametrize("shift", [3.0, 6.0])
def test_flow_euler_sigmas_and_timesteps_bit_identical(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    for steps in range(1, 51):
        sched.set_timesteps(steps)
        ours = S.flow_euler_sigmas(steps, shift)
        assert torch.equal(ours, sched.sigmas), steps
        assert torch.equal(S.sigma_to_timestep(ours[:-1], truncate=False), sched.timesteps), steps  # no truncation here


def test_shift():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(S.shift_sigmas(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scm_sigmas_are_sprint_scm_timesteps(steps):
    sched = SCMScheduler()
    sched.set_timesteps(steps, intermediate_timesteps=1.3 if steps == 2 else None)
    t = sched.timesteps
    assert torch.equal(S.scm_sigmas(steps), torch.sin(t) / (torch.cos(t) + torch.sin(t)))
    assert S.scm_sigmas(steps)[-1] == 0


# ------------------------------------------------------------------------------------------------ solvers


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 20])
@pytest.mark.parametrize("shift", [3.0, 6.0])
def test_flow_dpmpp_2m_step_by_step_vs_diffusers(steps, shift):
    v_fn, noise = ToyVelocity(), _noise()
    sched = _dpm(shift)
    sched.set_timesteps(steps)
    ref_x, ref_x0, x = [], [], noise.clone()
    for t in sched.timesteps:
        ref_x.append(x)
        x = sched.step(v_fn(x, t.float().expand(SHAPE[0])), t, x).prev_sample
        ref_x0.append(sched.model_outputs[-1])

    out, seen = _run(S.sample_flow_dpmpp_2m, _flow_model(v_fn, truncate=True), noise, S.flow_sigmas(steps, shift))
    assert len(seen) == steps
    for i, cb in enumerate(seen):
        assert _max_diff(cb["x"], ref_x[i]) < ATOL, i
        assert _max_diff(cb["denoised"], ref_x0[i]) < ATOL, i
    assert _max_diff(out, x) < ATOL


def test_flow_dpmpp_2m_uses_second_order_and_truncated_timesteps():
    """The parity above is not vacuous: a 1st-order solver or untruncated timesteps both miss diffusers."""
    v_fn, noise, sigmas = ToyVelocity(), _noise(), S.flow_sigmas(5)
    ref = S.sample_flow_dpmpp_2m(_flow_model(v_fn, True), noise, sigmas, disable=True)
    untruncated = S.sample_flow_dpmpp_2m(_flow_model(v_fn, False), noise, sigmas, disable=True)
    first_order = noise.clone()  # DPM-Solver++ 1st order = DDIM in flow space
    for i in range(5):
        x0 = _flow_model(v_fn, True)(first_order, sigmas[i].expand(SHAPE[0]))
        first_order = x0 + sigmas[i + 1] * (first_order - x0) / sigmas[i]
    assert _max_diff(ref, untruncated) > 1e-4 and _max_diff(ref, first_order) > 1e-3


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
@pytest.mark.parametrize("shift", [3.0, 6.0])
def test_flow_euler_step_by_step_vs_diffusers(steps, shift):
    v_fn, noise = ToyVelocity(), _noise()
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ref_x, x = [], noise.clone()
    for t in sched.timesteps:
        ref_x.append(x)
        x = sched.step(v_fn(x, t.expand(SHAPE[0])), t, x).prev_sample

    out, seen = _run(S.sample_flow_euler, _flow_model(v_fn, truncate=False), noise, S.flow_euler_sigmas(steps, shift))
    for i, cb in enumerate(seen):
        assert _max_diff(cb["x"], ref_x[i]) < ATOL, i
    assert _max_diff(out, x) < ATOL


def _tiny_transformer(guidance_embeds: bool) -> SanaTransformer2DModel:
    torch.manual_seed(0)
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
        sample_size=32, guidance_embeds=guidance_embeds, qk_norm="rms_norm_across_heads" if guidance_embeds else None,
    ).eval()
    with torch.no_grad():  # non-trivial weights everywhere (diffusers zero-inits some)
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _text(seed: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[:, 4:] = 0
    return torch.randn(batch, 6, 8, generator=g), mask


@pytest.mark.parametrize("steps", [3, 8])
def test_sana_pipeline_with_cfg_end_to_end(steps):
    """SanaPipeline (DPM-Solver, CFG 4.5, truncated timesteps) vs our sampler + cfg on the same tiny DiT."""
    dit = _tiny_transformer(guidance_embeds=False)
    (pos, pos_mask), (neg, neg_mask) = _text(2), _text(3)
    noise = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(4))
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=dit, scheduler=_dpm(3.0))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        prompt_embeds=pos, prompt_attention_mask=pos_mask, negative_prompt=None, negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask, guidance_scale=4.5, num_inference_steps=steps, height=64,
        width=96, latents=noise.clone(), output_type="latent", use_resolution_binning=False,
    ).images

    def model(x, sigma):
        v_uncond, v_cond = dit(
            torch.cat([x, x]), encoder_hidden_states=torch.cat([neg, pos]),
            encoder_attention_mask=torch.cat([neg_mask, pos_mask]),
            timestep=S.sigma_to_timestep(torch.cat([sigma, sigma]), truncate=True), return_dict=False,
        )[0].chunk(2)
        return S.flow_denoised(x, sigma, S.cfg(v_uncond, v_cond, 4.5))

    with torch.no_grad():
        ours = S.sample_flow_dpmpp_2m(model, noise.clone(), S.flow_sigmas(steps, 3.0), disable=True)
    assert _max_diff(ours, ref) < ATOL


# ------------------------------------------------------------------------------------------------ Sana-Sprint


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scm_matches_sana_sprint_pipeline(steps):
    """SanaSprintPipeline + SCMScheduler vs sample_scm + flow_denoised (x and sigma fed as they are, the guidance
    scale times guidance_embeds_scale 0.1), same generator."""
    dit = _tiny_transformer(guidance_embeds=True)
    text, mask = _text(5, batch=2)
    pipe = SanaSprintPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=dit, scheduler=SCMScheduler())
    pipe.set_progress_bar_config(disable=True)
    trig = []
    ref = pipe(
        prompt_embeds=text, prompt_attention_mask=mask, num_inference_steps=steps, guidance_scale=4.5,
        intermediate_timesteps=1.3 if steps == 2 else None, height=64, width=96,
        generator=torch.Generator().manual_seed(6), output_type="latent", use_resolution_binning=False,
        callback_on_step_end=lambda p, i, t, kw: trig.append((t, kw["latents"])) or {},
        callback_on_step_end_tensor_inputs=["latents"],
    ).images

    def model(x, sigma):
        guidance = torch.full([x.shape[0]], 4.5) * 0.1
        out = dit(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=sigma.expand(x.shape[0]),
                  guidance=guidance, return_dict=False)[0]
        return S.flow_denoised(x, sigma, out)

    gen = torch.Generator().manual_seed(6)
    sigmas = S.scm_sigmas(steps)
    x = sigmas[0] * torch.randn(2, 4, 2, 3, generator=gen)  # the pipeline's latents, in flow space
    with torch.no_grad():
        ours, seen = _run(S.sample_scm, model, x, sigmas, noise_sampler=S.default_noise_sampler(x, gen))
    # step by step: the pipeline's TrigFlow latents after step i, mapped to flow space, are our x at step i + 1
    sched = SCMScheduler()
    sched.set_timesteps(steps, intermediate_timesteps=1.3 if steps == 2 else None)
    for i in range(steps - 1):
        t_next = sched.timesteps[i + 1]
        flow = trig[i][1] / (0.5 * (torch.cos(t_next) + torch.sin(t_next)))
        assert _max_diff(seen[i + 1]["x"], flow) < ATOL, i
    assert _max_diff(ours, ref) < ATOL
    assert _max_diff(seen[-1]["denoised"], ref) < ATOL


# ------------------------------------------------------------------------------------------------ guidance


class _PAGOracle(PAGMixin):
    def __init__(self, pag_scale: float):
        self._pag_scale, self._pag_adaptive_scale, self.pag_applied_layers = pag_scale, 0.0, ["transformer_blocks.8"]


def test_cfg_and_pag_match_diffusers():
    g = torch.Generator().manual_seed(7)
    v_u, v_c, v_p = (torch.randn(SHAPE, generator=g) for _ in range(3))
    oracle = _PAGOracle(pag_scale=3.0)
    # batch order [uncond, cond, perturbed] with CFG, [cond, perturbed] without
    ref_cfg = oracle._apply_perturbed_attention_guidance(torch.cat([v_u, v_c, v_p]), True, 4.5, 999)
    ref_nocfg = oracle._apply_perturbed_attention_guidance(torch.cat([v_c, v_p]), False, 4.5, 999)
    assert torch.equal(S.pag(v_u, v_c, v_p, 4.5, 3.0), ref_cfg)
    assert torch.equal(S.pag(None, v_c, v_p, 4.5, 3.0), ref_nocfg)
    assert torch.equal(S.cfg(v_u, v_c, 4.5), v_u + 4.5 * (v_c - v_u))
    assert torch.equal(S.pag(v_u, v_c, v_p, 4.5, 0.0), S.cfg(v_u, v_c, 4.5))
    # on velocities or on denoised x0: same result (weights sum to 1)
    x, s = _noise(), torch.tensor([0.6, 0.3])
    x0s = [S.flow_denoised(x, s, v) for v in (v_u, v_c, v_p)]
    assert _max_diff(S.flow_denoised(x, s, ref_cfg), S.pag(*x0s, 4.5, 3.0)) < 1e-5


# ------------------------------------------------------------------------------------------------ contract


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_callback_contents(name):
    v_fn, noise = ToyVelocity(), _noise()
    sigmas = S.scm_sigmas(4) if name == "scm" else S.flow_sigmas(4)
    calls: list[tuple] = []

    def model(x, sigma):
        out = _flow_model(v_fn, truncate=False)(x, sigma)
        calls.append((x, sigma, out))
        return out

    out, seen = _run(S.get_sampler(name), model, noise, sigmas)
    assert [cb["i"] for cb in seen] == [0, 1, 2, 3]
    for cb, (x, sigma, x0) in zip(seen, calls):
        assert set(cb) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert cb["sigma"] == sigmas[cb["i"]] and cb["sigma_hat"] == cb["sigma"]
        assert torch.equal(sigma, sigmas[cb["i"]].expand(SHAPE[0]))
        assert cb["x"] is x and cb["denoised"] is x0
    assert torch.equal(seen[0]["x"], noise)
    if name == "flow_euler":
        assert _max_diff(out, seen[-1]["denoised"]) < ATOL  # x + (0 - s) v lands on x0 up to rounding
    else:
        assert torch.equal(out, seen[-1]["denoised"])  # the step to sigma 0 returns x0


def test_scm_seeded_runs_are_deterministic():
    v_fn, noise, sigmas = ToyVelocity(), _noise(), S.scm_sigmas(4)
    model = _flow_model(v_fn, truncate=False)

    def run(seed: int, skip_initial: bool = False) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        if skip_initial:  # the initial noise drawn from the same generator first (diffusers, ComfyUI)
            torch.randn(noise.shape, generator=generator)
        ns = S.default_noise_sampler(noise, generator)
        return S.sample_scm(model, noise.clone(), sigmas, disable=True, noise_sampler=ns)

    assert torch.equal(run(11), run(11))
    assert _max_diff(run(11), run(12)) > 1e-3

    def seeded(x, sigma, seed):  # ComfyUI passes its seed in extra_args; the model wrapper accepts it
        return model(x, sigma)

    by_seed = [S.sample_scm(seeded, noise, sigmas, {"seed": seed}, disable=True) for seed in (11, 11, 12)]
    assert torch.equal(by_seed[0], by_seed[1]) and torch.equal(by_seed[0], run(11, skip_initial=True))
    assert _max_diff(by_seed[0], by_seed[2]) > 1e-3


def test_errors_name_the_field():
    for fn in (S.flow_sigmas, S.flow_euler_sigmas, S.scm_sigmas):
        with pytest.raises(ValueError, match="steps"):
            fn(0)
    with pytest.raises(ValueError, match="flow_dpmpp_2m, flow_euler, scm"):
        S.get_sampler("dpmpp_2m")
    assert S.get_sampler("flow_euler") is S.sample_flow_euler
