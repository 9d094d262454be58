"""Flow-matching schedules, samplers and guidance for Sana, with the k-diffusion sampler signature.

Flow space (all of Sana, Sana 1.5 and Sana-Sprint): ``x_s = (1 - s) * x0 + s * noise`` for ``s`` in [0, 1].
The DiT predicts the velocity ``v = noise - x0``, so ``x0 = x_s - s * v`` (:func:`flow_denoised`).

Every sampler is ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None)`` where
``model(x, sigma_batch, **extra_args)`` returns the denoised ``x0`` (B, C, H, W) for ``x`` (B, C, H, W) and
``sigma_batch`` (B,), the same contract as ComfyUI's FLOW (``CONST``) models, so ComfyUI can use them unchanged.
``sigmas`` (steps + 1,) runs from the first noise level down to 0 (:func:`flow_sigmas`, :func:`flow_euler_sigmas`,
:func:`scm_sigmas`).

Starting latent: diffusers starts every Sana pipeline from ``x = noise`` although the first sigma of the DPM
schedule is ``shift(0.999)`` (0.99967 at shift 3), while ComfyUI starts from ``sigmas[0] * noise``
(``CONST.noise_scaling``). Pass ``x = noise`` to reproduce diffusers; the difference is a 3e-4 relative scale of
the initial latent. For Sprint the two coincide (``sigmas[0] = 1.0000037``, see :func:`scm_sigmas`).

Guidance (:func:`cfg`, :func:`pag`) is an affine combination whose weights sum to 1, so it gives the same result
on velocities (as diffusers does) or on denoised ``x0`` (as ComfyUI does): ``x - s * combine(v) == combine(x - s * v)``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm.auto import trange

from .spec import SCM_INTERMEDIATE_TIMESTEPS, SCM_MAX_TIMESTEPS

Model = Callable[..., torch.Tensor]  # model(x (B, C, H, W), sigma (B,), **extra_args) -> x0 (B, C, H, W)
Callback = Callable[[dict], None]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sigma, sigma_next) -> noise like x

NUM_TRAIN_TIMESTEPS = 1000


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


# ---------------------------------------------------------------------------------------------------- schedules


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift ``s' = shift * s / (1 + (shift - 1) * s)`` (same shape and dtype); keeps 0 and 1 fixed."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """Sana's Flow-DPM-Solver schedule (steps + 1,) float32, ending in 0.

    Bit-identical to ``DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).set_timesteps(steps)
    .sigmas``: ``1 - linspace(1, 1/1000, steps + 1)`` in float64 (numpy's linspace arithmetic), shifted, reversed,
    the trailing 0 dropped, so the first sigma is ``shift(0.999)`` and the last nonzero one ``shift(0.999/steps)``;
    then cast to float32 and a final 0 appended (``final_sigmas_type="zero"``).
    """
    _check_steps(steps)
    alphas = torch.from_numpy(np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps + 1))  # float64
    sigmas = shift_sigmas(1.0 - alphas, shift).flip(0)[:-1]
    return torch.cat([sigmas.float(), sigmas.new_zeros(1, dtype=torch.float32)])


def flow_euler_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """The schedule of ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)`` (steps + 1,) float32.

    diffusers shifts twice: its ``sigma_min`` is the already shifted float32 ``shift(1/1000)``, and the
    ``linspace(1, sigma_min, steps)`` between ``sigma_max = 1`` and it is shifted again (float64), cast to float32,
    and a final 0 appended. Reproduced bit for bit.
    """
    _check_steps(steps)
    sigma_min = shift_sigmas(torch.tensor(1.0) / NUM_TRAIN_TIMESTEPS, shift).item()  # float32 math, as diffusers
    t = np.linspace(1.0 * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps)
    sigmas = shift_sigmas(torch.from_numpy(t / NUM_TRAIN_TIMESTEPS), shift).float()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigma_to_timestep(sigma: torch.Tensor, *, truncate: bool) -> torch.Tensor:
    """The timestep the (non-Sprint) Sana DiT is given for flow sigma ``s``: ``1000 * s``, same shape and dtype.

    ``truncate=True`` reproduces the int64 truncation of diffusers' ``DPMSolverMultistepScheduler``, the default
    scheduler of ``SanaPipeline`` / ``SanaPAGPipeline``: it stores ``int64(1000 * sigma)`` as its timesteps (from
    the float64 sigmas, before they are cast to float32), the pipelines hand that to the DiT (times
    ``timestep_scale`` = 1.0), while the solver math uses the untruncated float32 sigmas. NVlabs ``SanaMS.forward``
    truncates too (``timestep.long()``). ``FlowMatchEulerDiscreteScheduler`` does NOT truncate: its timesteps are
    the float32 ``sigmas * 1000``; use ``truncate=False`` with :func:`flow_euler_sigmas`.

    The truncation is exact for the float32 sigma (as if computed in float64, the way diffusers computes its
    timesteps): it equals diffusers' value for every step count up to 332 at shift 3 and 350 at shift 6 (tests
    check 1-300); beyond, ``1000 * s`` can lie within float32 rounding of an integer and differ by 1. No float64
    is used (some accelerators have none): see :func:`trunc_1000`.
    """
    if truncate:
        return trunc_1000(sigma)
    return sigma * NUM_TRAIN_TIMESTEPS


def trunc_1000(sigma: torch.Tensor) -> torch.Tensor:
    """``trunc(1000 * s)`` of float32 ``s``, exact (as if in float64), computed in int64 on s's device.

    A float32 is ``m * 2^(e - 150)`` with the 24-bit integer mantissa ``m`` (implicit leading 1 for normal
    numbers) and the biased exponent ``e``; so ``1000 s = 1000 m * 2^(e - 150)``, whose integer part is
    ``(1000 m) >> (150 - e)`` for every ``s < 2^24``.
    """
    s = sigma.float().abs().contiguous()
    bits = s.view(torch.int32).long()
    exponent = (bits >> 23) & 0xFF
    mantissa = (bits & 0x7FFFFF) | torch.where(exponent > 0, 0x800000, 0)
    shift = (150 - exponent.clamp(min=1)).clamp(0, 62)
    return ((NUM_TRAIN_TIMESTEPS * mantissa) >> shift).to(sigma.dtype) * sigma.sign()


def scm_sigmas(steps: int, max_timesteps: float = SCM_MAX_TIMESTEPS,
               intermediate_timesteps: float | None = SCM_INTERMEDIATE_TIMESTEPS) -> torch.Tensor:
    """Sana-Sprint's schedule as flow sigmas (steps + 1,) float32, ending in 0.

    ``SCMScheduler.set_timesteps`` builds TrigFlow times ``t`` in [0, pi/2]: ``[max_timesteps,
    intermediate_timesteps, 0]`` for 2 steps, ``linspace(max_timesteps, 0, steps + 1)`` otherwise (float32).
    ``intermediate_timesteps`` is used only when ``steps == 2`` (diffusers raises for other step counts instead).

    TrigFlow state ``x_t = sigma_data * (cos t * x0 + sin t * n)`` equals ``sigma_data * (cos t + sin t) * x_s``
    with the flow state ``x_s = (1 - s) x0 + s n`` at ``s = sin t / (sin t + cos t)`` (computed in float32 exactly
    as ``SanaSprintPipeline`` computes its ``scm_timestep``). ``max_timesteps = 1.5708`` is slightly above pi/2,
    so ``sigmas[0] = 1.0000037``.
    """
    _check_steps(steps)
    if steps == 2 and intermediate_timesteps is not None:
        t = torch.tensor([max_timesteps, intermediate_timesteps, 0.0], dtype=torch.float32)
    else:
        t = torch.linspace(max_timesteps, 0.0, steps + 1, dtype=torch.float32)
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


# ---------------------------------------------------------------------------------------------- model in/output


def flow_denoised(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x0 = x - s * v`` for ``x``, ``v`` (B, C, H, W) and ``sigma`` (B,) or scalar.

    Turns a Sana DiT output (flow velocity) into the denoised latent the samplers expect. Sana-Sprint's output
    maps the same way, its DiT fed ``x`` itself, the sigma as its timestep (``SanaDiT.timestep``) and its
    guidance embedding (``SanaDiT.guidance``), with no CFG batch. Why this is all: ``SanaSprintPipeline`` feeds
    ``latents / sigma_data * sqrt(s^2 + (1 - s)^2)`` with ``s = sin t / (sin t + cos t)``; its latents are
    ``sigma_data * (cos t + sin t) * x`` and ``sqrt(s^2 + (1 - s)^2) = 1 / (cos t + sin t)``, so the input is
    exactly ``x``. Its output transform ``F -> sigma_data * ((1 - 2s) x_in + (1 - 2s + 2s^2) F) /
    sqrt(s^2 + (1 - s)^2)`` followed by the TrigFlow ``x0 = cos t * latents - sin t * that`` (divided by
    ``sigma_data`` at the end) simplifies to ``x0 = x - s F``. ``sigma_data`` cancels everywhere, so it does not
    appear in flow space. (diffusers ignores ``timestep_scale`` for Sprint; NVlabs multiplies the time by 1000
    and its model divides by ``timestep_norm_scale_factor`` = 1000.)
    """
    return x - sigma.reshape(-1, *([1] * (x.ndim - 1))) * v


def cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``v_u + g (v_c - v_u)`` (diffusers' order; its batch is ``[uncond, cond]``).

    diffusers runs no unconditional branch when ``scale <= 1``.
    """
    return v_uncond + scale * (v_cond - v_uncond)


def pag(
    v_uncond: torch.Tensor | None, v_cond: torch.Tensor, v_perturbed: torch.Tensor, scale: float, pag_scale: float
) -> torch.Tensor:
    """Perturbed-attention guidance as ``SanaPAGPipeline``: ``v_u + g (v_c - v_u) + p (v_c - v_pag)``.

    diffusers' batch is ``[uncond, cond, perturbed]`` with CFG and ``[cond, perturbed]`` without it
    (``v_uncond=None``, used when ``scale <= 1``): then ``v_c + p (v_c - v_pag)``. The perturbed branch uses the
    conditional prompt with the self-attention of the chosen blocks replaced by identity.
    """
    guided = v_cond if v_uncond is None else cfg(v_uncond, v_cond, scale)
    return guided + pag_scale * (v_cond - v_perturbed)


# ------------------------------------------------------------------------------------------------------ samplers


Generators = torch.Generator | list[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """Standard-normal float32 noise of `shape` (B, ...) drawn on the generator's device (the CPU when None),
    so seeded runs are reproducible across devices. A list of B generators draws each sample from its own
    (diffusers' convention), so an image does not depend on what else is in its batch."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g) for g in generator])
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def default_noise_sampler(x: torch.Tensor, generator: Generators = None) -> NoiseSampler:
    """Fresh standard-normal noise shaped like ``x`` (B, C, H, W) on each call, drawn by :func:`randn`."""

    def sample(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return randn(tuple(x.shape), generator).to(x)

    return sample


@torch.no_grad()
def sample_flow_euler(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
    callback: Callback | None = None, disable: bool | None = None,
) -> torch.Tensor:
    """Flow Euler: ``x <- x + (s_next - s) v`` with ``v = (x - x0) / s``.

    Matches ``FlowMatchEulerDiscreteScheduler(shift)`` with :func:`flow_euler_sigmas` and un-truncated timesteps.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        v = (x - denoised) / sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


@torch.no_grad()
def sample_flow_dpmpp_2m(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
    callback: Callback | None = None, disable: bool | None = None,
) -> torch.Tensor:
    """Flow-DPM-Solver: DPM-Solver++ 2M (data prediction, midpoint) on alpha = 1 - s, sigma = s.

    With ``lambda = log(alpha / sigma)``, ``h = lambda_next - lambda``:
    first step 1st order ``x <- (s_next/s) x - alpha_next (e^-h - 1) x0``; later steps add
    ``- 0.5 alpha_next (e^-h - 1) D1`` with ``D1 = (x0 - x0_prev) h / (lambda - lambda_prev)``. A step to sigma 0
    returns ``x0``: in Sana's configuration (``final_sigmas_type="zero"``) diffusers' ``DPMSolverMultistepScheduler``
    forces the last step to 1st order for every step count (``euler_at_final`` is False and ``lower_order_final``
    adds nothing for ``solver_order=2``), and that step lands exactly on ``x0``. So 1 or 2 steps never use the
    2nd-order update. Coefficients are computed in the sigmas' dtype, in diffusers' order (float32 for
    :func:`flow_sigmas`), so the trajectory matches diffusers bit for bit in the tests.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])

    def lam(s: torch.Tensor) -> torch.Tensor:
        return torch.log(1 - s) - torch.log(s)

    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": denoised})
        if s_next == 0:
            x = denoised
        else:
            h = lam(s_next) - lam(s)
            step = (1 - s_next) * (torch.exp(-h) - 1.0)
            x = (s_next / s) * x - step * denoised
            if old_denoised is not None:
                r = (lam(s) - lam(sigmas[i - 1])) / h
                x = x - 0.5 * step * ((1.0 / r) * (denoised - old_denoised))
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_scm(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
    callback: Callback | None = None, disable: bool | None = None, *, noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Sana-Sprint's SCM (TrigFlow consistency) sampler in flow space, like k-diffusion's ``sample_lcm``.

    Each step denoises to ``x0`` and re-noises to the next sigma with fresh noise:
    ``x <- (1 - s_next) x0 + s_next n``; the step to 0 returns ``x0``. With :func:`scm_sigmas` this is
    ``SCMScheduler.step`` (``x_t' = cos t' x0_trig + sin t' sigma_data n``) divided by ``sigma_data (cos t' +
    sin t')``. The noise of diffusers' step to t = 0 (multiplied by sin 0 = 0) is not drawn. ``noise_sampler``
    defaults to :func:`default_noise_sampler` on a generator seeded with ``extra_args["seed"]`` (ComfyUI passes
    it) that first skips one draw of x's shape, the initial noise ComfyUI drew from the same seed, so the
    stream equals diffusers' continuing generator; without a seed it draws from torch's global generator.
    """
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        generator, seed = None, extra_args.get("seed")
        if seed is not None:  # the host drew the initial noise from this seed (ComfyUI): continue after it, as
            generator = torch.Generator().manual_seed(seed)  # diffusers' pipeline continues its generator
            torch.randn(x.shape, generator=generator)
        noise_sampler = default_noise_sampler(x, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = denoised
        if sigmas[i + 1] > 0:
            x = (1 - sigmas[i + 1]) * denoised + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "flow_dpmpp_2m": sample_flow_dpmpp_2m,
    "flow_euler": sample_flow_euler,
    "scm": sample_scm,
}


def sampler_sigmas(name: str, steps: int, shift: float = 3.0, max_timesteps: float = SCM_MAX_TIMESTEPS,
                   intermediate_timesteps: float | None = SCM_INTERMEDIATE_TIMESTEPS) -> torch.Tensor:
    """The schedule each sampler was matched against: DPM's for ``flow_dpmpp_2m``, FlowMatchEuler's for
    ``flow_euler``, Sprint's TrigFlow times for ``scm`` (``shift`` unused there; the two times only there)."""
    get_sampler(name)
    if name == "scm":
        return scm_sigmas(steps, max_timesteps, intermediate_timesteps)
    return (flow_euler_sigmas if name == "flow_euler" else flow_sigmas)(steps, shift)


def denoise_sigmas(name: str, steps: int, shift: float = 3.0, denoise: float = 1.0, **scm_times: float) -> torch.Tensor:
    """`steps` + 1 sigmas for a partial run (image-to-image): as ComfyUI's KSampler, the last `steps` steps of
    an int(steps / denoise)-step schedule; the whole schedule when denoise is 1. `scm_times`: Sprint's
    `max_timesteps` / `intermediate_timesteps` (see :func:`scm_sigmas`)."""
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise={denoise} must be in (0, 1]")
    return sampler_sigmas(name, steps if denoise >= 1 else int(steps / denoise), shift, **scm_times)[-(steps + 1):]


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler registered as ``name`` in :data:`SAMPLERS`; ValueError listing the valid names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown name {name!r}, valid names are {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
