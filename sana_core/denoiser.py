"""The DiT as a flow denoiser `model(x, sigma) -> x0`, with CFG / PAG batching, for any k-diffusion sampler.

Flow space: x_t = (1 - s) x0 + s noise; the DiT predicts v = noise - x0, so x0 = x_t - s v.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from . import precision
from .controlnet import Control
from .dit import SanaDiT
from .samplers import Generators, cfg, default_noise_sampler, denoise_sigmas, flow_denoised, get_sampler, pag
from .spec import SANA

log = logging.getLogger(__name__)


@dataclass
class TextCondition:
    """Gemma states for a batch. embeds: (B, T, 2304); mask: (B, T) int, 1 for real tokens."""

    embeds: torch.Tensor
    mask: torch.Tensor

    def repeat(self, n: int) -> "TextCondition":
        """Each sample n times in a row: (B, ...) -> (B*n, ...)."""
        return TextCondition(self.embeds.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0))


class TextKVCache:
    """The text keys/values (`SanaDiT.text_kv`, `SanaControlNet.text_kv`) of the captions of one sampling run: they
    do not change over the steps. Keyed by the model, its compute dtype and the captions and mask (the same
    tensors, else equal content: ComfyUI concatenates the same captions anew every step); kept for one run only,
    so a LoRA or weight change between runs never meets stale values. The engine's and the ComfyUI nodes' cache."""

    def __init__(self, size: int = 8):
        self.size, self.entries = size, []  # [(model, context, mask, dtype, kv)]

    def get(self, model: torch.nn.Module, dtype: torch.dtype, context: torch.Tensor, mask: torch.Tensor | None,
            compute: Callable[[], list]) -> list:
        """The cached keys/values of `model` for (context, mask) in `dtype`, else `compute()` stored."""
        for o, c, m, d, kv in self.entries:
            if o is model and d == dtype and _same(c, context) and (m is mask or (
                    m is not None and mask is not None and _same(m, mask))):
                return kv
        kv = compute()
        self.entries = [(model, context, mask, dtype, kv)] + self.entries[: self.size - 1]
        return kv


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tensor, or equal ones (without a host sync when they are the same object)."""
    return a is b or (a.shape == b.shape and a.device == b.device and torch.equal(a, b))


@dataclass
class SanaDenoiser:
    """Calls the DiT once per step on the batch [uncond | cond | perturbed] that the guidance needs.

    v = v_u + g (v_c - v_u)   (CFG: on when g > 1 and `uncond` is given)
          + p (v_c - v_pag)   (PAG: on when p > 0; the `pag_layers` self-attentions become the identity).
    Sprint models take no CFG branch: the guidance scale enters through the DiT's guidance embedder.
    `truncate_timesteps` feeds int(1000 * sigma), as NVlabs and diffusers' DPM-Solver do (not FlowMatchEuler).
    A DiT computing in float16 is checked every step and widened if it overflows (`precision.run_finite`); other
    dtypes are checked without a host sync per step, once at the end (`check_finite`).
    `cudagraph_steps`: mark each DiT call as a new step for a DiT compiled with CUDA graphs (a call's outputs
    are not read after the next call, which reuses their memory).
    The text side is prepared once (first call) and reused every step (`TextKVCache`): each block's text
    keys/values, the ControlNets' copied blocks' too, each caption on its real tokens (`dit.TextGroups`).
    `controls`: ControlNets acting on every branch of the batch (their hint is repeated for CFG and PAG, as
    NVlabs and diffusers do), each on the steps of its [start, end] fraction (`schedule_controls`).
    """

    dit: SanaDiT
    cond: TextCondition
    uncond: TextCondition | None = None
    guidance_scale: float = SANA.guidance_scale
    pag_scale: float = 0.0
    pag_layers: tuple[int, ...] = SANA.pag_layers
    truncate_timesteps: bool = True
    cudagraph_steps: bool = False
    controls: Sequence[Control] = ()
    _windows: list[tuple[float, float]] | None = field(default=None, init=False, repr=False)
    _text: tuple | None = field(default=None, init=False, repr=False)  # (device, (captions, mask)) of the batch
    _kv: TextKVCache = field(default_factory=TextKVCache, init=False, repr=False)
    _finite: torch.Tensor | None = field(default=None, init=False, repr=False)  # all outputs finite so far

    def __post_init__(self) -> None:
        depth = self.dit.cfg.depth
        if self.pag_scale > 0 and not all(0 <= i < depth for i in self.pag_layers):
            raise ValueError(f"pag_layers {list(self.pag_layers)} must be block indices in 0..{depth - 1}")

    @property
    def sprint(self) -> bool:
        return self.dit.cfg.guidance_embed

    @property
    def use_cfg(self) -> bool:
        return not self.sprint and self.uncond is not None and self.guidance_scale > 1.0

    def text_side(self, device: torch.device) -> tuple[torch.Tensor, list, list]:
        """(mask (nB, T), per-block text K/V, per-ControlNet per-block text K/V) for the batch
        [cond | uncond | cond (PAG)], from the run's `TextKVCache`."""
        if self._text is None or self._text[0] != device:
            branches = [self.cond] + ([self.uncond] if self.use_cfg else []) + ([self.cond] * (self.pag_scale > 0))
            self._text = device, (torch.cat([c.embeds for c in branches]).to(device),
                                  torch.cat([c.mask for c in branches]).to(device))
        embeds, mask = self._text[1]
        dtype = self.dit.compute_dtype
        return (mask, self._kv.get(self.dit, dtype, embeds, mask, lambda: self.dit.text_kv(embeds, mask)),
                [self._kv.get(c.net, dtype, embeds, mask, lambda net=c.net: net.text_kv(embeds, self.dit, mask))
                 for c in self.controls])

    def schedule_controls(self, sigmas: torch.Tensor) -> None:
        """Turn each ControlNet's [start, end] fraction of the steps into the sigmas it acts at, for the schedule
        `sigmas` (steps + 1 values, decreasing): step i of n runs when not (i / n < start or (i + 1) / n > end),
        diffusers' `control_guidance_start/end` rule."""
        n, s = len(sigmas) - 1, [float(v) for v in sigmas]
        self._windows = []
        for c in self.controls:
            steps = [i for i in range(n) if not (i / n < c.start or (i + 1) / n > c.end)]
            self._windows.append((s[steps[-1]], s[steps[0]]) if steps else (float("inf"), float("-inf")))

    def _active(self, sigma: float, n: int, kv: list) -> list[Control]:
        """The ControlNets acting at `sigma`, with their hints repeated for the n branches of B samples."""
        out = []
        for i, c in enumerate(self.controls):
            lo, hi = self._windows[i] if self._windows is not None else (float("-inf"), float("inf"))
            if lo - 1e-6 <= sigma <= hi + 1e-6:
                hint = c.hint if c.hint.shape[0] == 1 else c.hint.repeat(n, 1, 1, 1)
                out.append(replace(c, hint=hint, text_kv=kv[i]))
        if len(out) < len(self.controls):
            log.debug("%d of %d ControlNets act at sigma %.4f", len(out), len(self.controls), sigma)
        return out

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args: object) -> torch.Tensor:
        """x: (B, 32, h, w) flow-space latent; sigma: (B,) or scalar in [0, 1] -> x0, same shape, fp32.

        `extra_args` (such as k-diffusion's `seed`) are accepted and ignored."""
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(B)
        if self.cond.embeds.shape[0] != B:
            raise ValueError(f"text batch {self.cond.embeds.shape[0]} does not match the latent batch {B}")
        n = 1 + self.use_cfg + (self.pag_scale > 0)
        if self.dit.compute_dtype == torch.float16:
            models = precision.Widened(self.dit, *(c.net for c in self.controls))
            v = precision.run_finite(lambda: self._velocity(x, sigma, n), models, "the DiT")
        else:  # no host sync per step: `check_finite` looks once, after sampling
            v = self._velocity(x, sigma, n)
            finite = torch.isfinite(v).all()
            self._finite = finite if self._finite is None else self._finite & finite
        parts = v.chunk(n)                                   # [cond | uncond (CFG) | perturbed (PAG)]
        v_c, v_u = parts[0], parts[1] if self.use_cfg else None
        if self.pag_scale > 0:
            out = pag(v_u, v_c, parts[-1], self.guidance_scale, self.pag_scale)
        else:
            out = v_c if v_u is None else cfg(v_u, v_c, self.guidance_scale)
        return flow_denoised(x.float(), sigma, out)

    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor, n: int) -> torch.Tensor:
        """One DiT call on the n branches of x (B, 32, h, w) -> v (n*B, 32, h, w) fp32."""
        B = x.shape[0]
        mask, kv, control_kv = self.text_side(x.device)
        controls = self._active(float(sigma[0]), n, control_kv) if self.controls else ()
        pag_batch = None
        if self.pag_scale > 0:
            pag_batch = torch.arange(n * B, device=x.device) >= (n - 1) * B
        guidance = None
        if self.sprint:
            guidance = self.dit.guidance(self.guidance_scale, n * B, x.device)
        if self.cudagraph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        return self.dit(x.repeat(n, 1, 1, 1), self.dit.timestep(sigma, self.truncate_timesteps).repeat(n), None, mask,
                        guidance=guidance, pag_layers=self.pag_layers if self.pag_scale > 0 else (),
                        pag_batch=pag_batch, text_kv=kv, controls=controls).float()

    def check_finite(self) -> None:
        """Raise FloatingPointError if any DiT output so far (bfloat16/float32 runs) had inf/NaN."""
        if self._finite is not None and not self._finite:
            raise FloatingPointError(f"the DiT produced inf/NaN while sampling in {self.dit.dtype}: check the "
                                     "checkpoint (and any LoRA) and the inputs")


@dataclass
class MaskedDenoiser:
    """Training-free inpainting by latent blending with re-noising (NVlabs' and ComfyUI's KSampler semantics):
    before each step the kept region of x is the input latent noised to the current sigma with the run's own
    noise, and the denoised output keeps the input there, so only the masked region is generated.

    init: (B, 32, h, w) scaled input latent; noise: the run's initial noise, same shape; mask: (B or 1, 1, h, w)
    in [0, 1] at latent resolution, 1 = generate, 0 = keep (`latent_mask`)."""

    inner: Any
    init: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args: object) -> torch.Tensor:
        s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1)
        keep = 1 - self.mask
        x = x * self.mask + ((1 - s) * self.init + s * self.noise) * keep
        return self.inner(x, sigma, **extra_args) * self.mask + self.init * keep


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An image mask (B, H, W) or (H, W), 1 = repaint -> (B, 1, h, w) at latent size `size`, by bilinear
    resizing as ComfyUI's sampler prepares noise masks."""
    mask = mask.float().reshape(-1, 1, *mask.shape[-2:])
    return torch.nn.functional.interpolate(mask, size=size, mode="bilinear").clamp(0, 1)


def sample(denoiser: SanaDenoiser, noise: torch.Tensor, sampler: str = SANA.sampler, steps: int = SANA.steps,
           shift: float = SANA.shift, denoise: float = 1.0, init: torch.Tensor | None = None,
           generator: Generators = None, callback: Any = None, progress: bool = True,
           mask: torch.Tensor | None = None, **scm_times: float) -> torch.Tensor:
    """Run a sampler on the denoiser -> x0 (B, 32, h, w), in the DiT's (scaled) latent space.

    noise: (B, 32, h, w) standard normal; text-to-image starts from it as NVlabs and diffusers do.
    denoise < 1 (image-to-image): as ComfyUI, the last `steps` of an int(steps / denoise)-step schedule, starting
    from `init` (scaled latent) noised to the first sigma. mask: (B or 1, 1, h, w), 1 = generate: inpainting of
    `init` (`MaskedDenoiser`), which then also starts from `init` noised to the first sigma at denoise 1, as
    ComfyUI does. generator: source of SCM's fresh noise per step (one, or one per sample); `scm_times`:
    Sprint's `max_timesteps` / `intermediate_timesteps`.
    """
    sigmas = denoise_sigmas(sampler, steps, shift, denoise, **scm_times)
    denoiser.schedule_controls(sigmas)
    x, model = noise.float(), denoiser
    if denoise < 1 or mask is not None:
        if init is None:
            raise ValueError("denoise < 1 and inpainting need the latent to start from (init)")
        x = (1 - sigmas[0]) * init.to(x) + sigmas[0] * x
    if mask is not None:
        model = MaskedDenoiser(denoiser, init.to(x), noise.float(), mask.to(x))
    extra = {"noise_sampler": default_noise_sampler(x, generator)} if sampler == "scm" else {}
    x0 = get_sampler(sampler)(model, x, sigmas.to(x.device), callback=callback, disable=not progress, **extra)
    denoiser.check_finite()
    return x0
