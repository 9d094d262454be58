"""The training objective: NVlabs' flow-matching loss, its timestep densities and loss weightings, caption dropout.

Pure functions of tensors (no model state), each testable against diffusers' `training_utils`.

NVlabs (`diffusion/model/respace.py`, `gaussian_diffusion.py`, scheduler `linear_flow`): a timestep index
`i = int(u * 1000)` is drawn from a density over u in [0, 1) (`logit_normal` by default: u = sigmoid(N(m, s))),
the flow sigma is the index's entry of the table `s_i = i / 1000`, shifted `s' = shift s / (1 + (shift - 1) s)`
(`samplers.shift_sigmas`), the latent is noised to `x_t = (1 - s') x0 + s' noise`, the DiT is fed
`trunc(1000 s')` (`SanaDiT.timestep`, the one place of that convention) and the loss is the MSE to the velocity
`noise - x0` over all elements. diffusers' DreamBooth scripts use the same densities and add a per-sigma weighting
(`compute_loss_weighting_for_sd3`); both are offered here. diffusers indexes its FlowMatchEuler timestep table,
which runs from sigma 1 downwards, so for an asymmetric density (`mode`, a nonzero logit mean) its u is our 1 - u.
"""
from __future__ import annotations

import math

import torch

from ..dit import SanaDiT
from ..samplers import NUM_TRAIN_TIMESTEPS, shift_sigmas

#: u densities (diffusers' `compute_density_for_timestep_sampling` names; anything else there is uniform)
DENSITIES = ("logit_normal", "mode", "uniform")
#: per-sample loss weightings (diffusers' `compute_loss_weighting_for_sd3`; "none" is NVlabs' unweighted MSE)
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def sample_u(density: str, batch: int, generator: torch.Generator | None = None, logit_mean: float = 0.0,
             logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """(batch,) float32 draws of u in [0, 1] on the CPU, from `generator`: the same numbers as diffusers'
    `compute_density_for_timestep_sampling` with the same generator state."""
    if density == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, size=(batch,), generator=generator))
    u = torch.rand(batch, generator=generator)
    if density == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if density == "uniform":
        return u
    raise ValueError(f"timestep density {density!r}: valid are {', '.join(DENSITIES)}")


def sigmas_from_u(u: torch.Tensor, shift: float) -> torch.Tensor:
    """NVlabs' flow sigma for draws u (B,): index i = int(1000 u) (at most 999), sigma = shift(i / 1000). float32."""
    index = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    return shift_sigmas(index.double() / NUM_TRAIN_TIMESTEPS, shift).float()


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights for sigmas (B,): 1 ("none"), sigma^-2 ("sigma_sqrt"), 2 / (pi (1 - 2s + 2s^2))
    ("cosmap"), as diffusers' `compute_loss_weighting_for_sd3`."""
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    raise ValueError(f"loss weighting {scheme!r}: valid are {', '.join(WEIGHTINGS)}")


def noised(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - s) x0 + s noise for latents (B, C, H, W) and sigmas (B,)."""
    s = sigmas.to(x0).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def flow_loss(dit: torch.nn.Module, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
              context: torch.Tensor, context_mask: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """Per-sample flow-matching loss (B,) float32: mean over C, H, W of w(s) (v_pred - (noise - x0))^2.

    dit: a SanaDiT (or a DDP/FSDP wrapper around one, whose forward it calls); x0, noise: (B, 32, h, w) scaled
    latents and standard-normal noise; sigmas: (B,) flow sigmas (already shifted); context (B, T, 2304) and
    context_mask (B, T) the caption embeddings. The DiT is fed `SanaDiT.timestep(sigmas)` (NVlabs' truncation).
    """
    model = dit.module if hasattr(dit, "module") else dit
    if not isinstance(model, SanaDiT):
        raise TypeError(f"flow_loss needs a SanaDiT (or a wrapper with .module), got {type(model).__name__}")
    pred = dit(noised(x0, noise, sigmas), model.timestep(sigmas.to(x0.device)), context, context_mask)
    per_element = (pred.float() - (noise - x0).float()) ** 2
    return loss_weighting(weighting, sigmas.to(x0.device)).float() * per_element.flatten(1).mean(1)


def drop_captions(embeds: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor, null_embeds: torch.Tensor,
                  null_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the captions of the samples where `drop` (B,) bool is set by the null caption.

    embeds (B, T, D), mask (B, T); null_embeds (T, D). null_mask (T,): the mask to use with it, or None to keep
    each sample's own mask (NVlabs: its `y_embedder.y_embedding` replaces the caption, the mask stays).
    """
    d = drop.to(embeds.device)
    embeds = torch.where(d[:, None, None], null_embeds.to(embeds)[None], embeds)
    if null_mask is not None:
        mask = torch.where(d[:, None], null_mask.to(mask)[None], mask)
    return embeds, mask
