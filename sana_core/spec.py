"""Every model fact and default the samplers need, one place: a `ModelSpec` per DiT variant (`dit.VARIANTS`),
filled from the checkpoint's own files where they say it.

The pipeline, the CLI, the ComfyUI nodes (model sampling, latent format, widget defaults), the trainer, the
workflows builder and the tiny-model writer read their defaults here; nothing else writes them down.

Sources: diffusers' `SanaPipeline` / `SanaPAGPipeline` / `SanaSprintPipeline` defaults and the released
folders' `scheduler/scheduler_config.json` (`flow_shift`: 3.0 for 512-2K, 6.0 for the 4K model, as NVlabs'
configs), the DC-AE's `config.json` (`scaling_factor`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dit import DiTConfig

log = logging.getLogger(__name__)

LATENT_SCALE = 0.41407         # DC-AE f32c32 (Sana 1.0 / 1.1): DiT latent = raw DC-AE latent * this
LATENT_FACTOR = 32             # image pixels per latent pixel (each side)
SCM_MAX_TIMESTEPS = 1.57080    # Sana-Sprint's first TrigFlow time (diffusers' SCMScheduler / SanaSprintPipeline)
SCM_INTERMEDIATE_TIMESTEPS = 1.3  # its middle time in a 2-step run


@dataclass(frozen=True)
class ModelSpec:
    """How a Sana model is sampled unless told otherwise.

    steps / sampler: diffusers' default call (20 Flow-DPM-Solver steps; Sprint: 2 SCM steps).
    shift: flow shift of the schedule, the same for every image size (diffusers' `flow_shift`); Sprint: 1.0
    (its SCM times are fixed; a flow sampler on Sprint runs unshifted, as ComfyUI's model sampling of it).
    guidance_scale: CFG (Sprint: the guidance embedder's input is guidance_scale * `DiTConfig.guidance_embeds_scale`).
    pag_scale / pag_layers: perturbed-attention guidance when asked for (diffusers' SanaPAGPipeline scale,
    NVlabs' block 8); PAG is off unless a scale is given (API, CLI, SanaSampler) or a SanaPAG node is wired.
    max_timesteps / intermediate_timesteps: Sprint's SCM times (the middle one for 2 steps only).
    timestep_multiplier / truncate_timesteps: the DiT is fed int(1000 * sigma) * timestep_scale (NVlabs, diffusers'
    DPM-Solver); Sprint the sigma itself (see `SanaDiT.timestep`).
    latent_scale / latent_factor: the DC-AE latent scaling and its 32x compression.
    size: default image side in pixels (diffusers: the transformer's `sample_size` * 32).
    """

    steps: int = 20
    sampler: str = "flow_dpmpp_2m"
    shift: float = 3.0
    guidance_scale: float = 4.5
    pag_scale: float = 3.0
    pag_layers: tuple[int, ...] = (8,)
    max_timesteps: float = SCM_MAX_TIMESTEPS
    intermediate_timesteps: float = SCM_INTERMEDIATE_TIMESTEPS
    timestep_multiplier: float = 1000.0
    truncate_timesteps: bool = True
    latent_scale: float = LATENT_SCALE
    latent_factor: int = LATENT_FACTOR
    size: int = 1024

    @property
    def sprint(self) -> bool:
        return self.sampler == "scm"


SANA = ModelSpec()
SPRINT = replace(SANA, steps=2, sampler="scm", shift=1.0, timestep_multiplier=1.0)
SHIFT_4K = 6.0  # NVlabs' 4K config and the 4K diffusers folder's flow_shift


def model_spec(cfg: DiTConfig, folder: str | Path | None = None, latent_scale: float | None = None) -> ModelSpec:
    """The spec of a DiT of config `cfg`: Sprint's (guidance embedder) or Sana's, the 4K model's shift from its
    sin-cos grid (`use_pe` at base size 128, i.e. 4096 px), the default size from its base size. A diffusers
    folder (`folder`, its root or a part such as `transformer/`) overrides the shift with its scheduler's
    `flow_shift` and the latent scale with its DC-AE's `scaling_factor`; `latent_scale` (a loaded DC-AE's)
    wins over both."""
    spec = SPRINT if cfg.guidance_embed else SANA
    spec = replace(spec, size=cfg.base_size * LATENT_FACTOR)
    if not cfg.guidance_embed and cfg.use_pe and cfg.base_size >= 128:
        spec = replace(spec, shift=SHIFT_4K)
    root = pipeline_root(folder)
    if root is not None:
        scheduler = _read(root / "scheduler" / "scheduler_config.json")
        if scheduler.get("flow_shift") is not None and not cfg.guidance_embed:
            spec = replace(spec, shift=float(scheduler["flow_shift"]))
        for key in ("max_timesteps", "intermediate_timesteps"):
            if cfg.guidance_embed and scheduler.get(key) is not None:
                spec = replace(spec, **{key: float(scheduler[key])})
        vae = _read(root / "vae" / "config.json")
        if vae.get("scaling_factor") is not None:
            spec = replace(spec, latent_scale=float(vae["scaling_factor"]))
    if latent_scale is not None:
        spec = replace(spec, latent_scale=float(latent_scale))
    return spec


def pipeline_root(path: str | Path | None) -> Path | None:
    """The diffusers pipeline folder `path` is (holds `model_index.json` or `scheduler/`) or is a part of
    (`transformer/`, `vae/`, ...); None for a single file or a lone part."""
    if path is None:
        return None
    path = Path(path)
    for root in (path, path.parent):
        if root.is_dir() and ((root / "model_index.json").is_file() or (root / "scheduler").is_dir()):
            return root
    return None


def _read(path: Path) -> dict[str, Any]:
    """A JSON object file, {} when absent; a broken one is an error naming it."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
