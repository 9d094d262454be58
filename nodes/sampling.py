"""Sampling nodes: SanaSampler (the engine's exact sampling), and the same solvers as SAMPLER / SIGMAS for
SamplerCustomAdvanced."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from sana_core.samplers import SAMPLERS

from .common import CATEGORY

log = logging.getLogger(__name__)
SAMPLER_NAMES = list(SAMPLERS)


def _check(sampler: str) -> bool | str:
    return True if sampler in SAMPLERS else f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}"


def parse_layers(text: str) -> tuple[int, ...]:
    """"8" or "7, 8" -> block indices; ValueError naming the field otherwise."""
    try:
        return tuple(int(p) for p in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"pag_layers: expected block numbers such as '8' or '7, 8', got {text!r}") from None


def text_condition(conditioning: list, batch: int, name: str):
    """CONDITIONING -> the engine's TextCondition for `batch` samples (the first entry; masks per sample)."""
    from sana_core.denoiser import TextCondition

    if not conditioning:
        raise ValueError(f"{name}: empty conditioning; connect a SanaGemmaTextEncode")
    if len(conditioning) > 1:
        log.warning("SanaSampler: %s has %d entries (combined/area conditioning); using the first, as a whole "
                    "image prompt (KSampler handles combined conditioning)", name, len(conditioning))
    embeds, extra = conditioning[0][0], conditioning[0][1]
    if embeds.ndim != 3 or "attention_mask" not in extra:
        raise ValueError(f"{name}: not Sana conditioning (shape {tuple(embeds.shape)}, no attention mask); "
                         "encode prompts with SanaGemmaTextEncode")
    mask = extra["attention_mask"]
    if embeds.shape[0] not in (1, batch):
        raise ValueError(f"{name}: {embeds.shape[0]} prompts for a batch of {batch} latents")
    return TextCondition(embeds.expand(batch, -1, -1), mask.expand(batch, -1))


class SanaSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaSampler", display_name="Sana Sampler", category=CATEGORY,
            description="Samples a Sana MODEL exactly as the sana_core engine (and NVlabs / diffusers) do: "
                        "Flow-DPM-Solver (default), flow Euler, or SCM for Sana-Sprint; CFG on the negative prompt "
                        "and PAG (perturbed-attention guidance) on chosen blocks. denoise < 1 starts from the "
                        "input latent (image-to-image).",
            inputs=[io.Model.Input("model"), io.Conditioning.Input("positive"), io.Conditioning.Input("negative"),
                    io.Latent.Input("latent_image"),
                    io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                    io.Int.Input("steps", default=20, min=1, max=200, tooltip="20 for Sana, 1-4 for Sprint"),
                    io.Float.Input("cfg", default=4.5, min=0.0, max=30.0, step=0.1, round=0.01,
                                   tooltip="guidance scale (Sprint: fed to its guidance embedder)"),
                    io.Float.Input("pag_scale", default=0.0, min=0.0, max=20.0, step=0.1, round=0.01,
                                   tooltip="perturbed-attention guidance; 0 turns it off"),
                    io.String.Input("pag_layers", default="8", tooltip="blocks whose self-attention PAG perturbs"),
                    io.Float.Input("shift", default=3.0, min=0.1, max=20.0, step=0.1, tooltip="3.0; 6.0 for 4K"),
                    io.Combo.Input("sampler", options=SAMPLER_NAMES, default="flow_dpmpp_2m",
                                   tooltip="use scm for Sana-Sprint models"),
                    io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01)],
            outputs=[io.Latent.Output()])

    @classmethod
    def validate_inputs(cls, sampler: str, pag_layers: str) -> bool | str:
        try:
            parse_layers(pag_layers)
        except ValueError as e:
            return str(e)
        return _check(sampler)

    @classmethod
    def execute(cls, model, positive, negative, latent_image: dict, seed: int, steps: int, cfg: float,
                pag_scale: float, pag_layers: str, shift: float, sampler: str, denoise: float) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils
        import latent_preview

        from sana_core.denoiser import SanaDenoiser, sample

        latent = latent_image["samples"]
        if latent.ndim != 4 or latent.shape[1] != 32:
            raise ValueError(f"SanaSampler: latent_image must be a Sana latent (B, 32, H/32, W/32), got "
                             f"{tuple(latent.shape)}; use SanaEmptyLatentImage or SanaDCAEEncode")
        B = latent.shape[0]
        mm.load_models_gpu([model])
        dit, device = model.model.diffusion_model, model.load_device
        fmt = model.model.latent_format
        generator = torch.Generator().manual_seed(seed)  # = ComfyUI's prepare_noise; SCM continues from it
        noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32)
        denoiser = SanaDenoiser(dit, text_condition(positive, B, "positive"), text_condition(negative, B, "negative"),
                                cfg, pag_scale, parse_layers(pag_layers))
        preview = latent_preview.prepare_callback(model, steps)

        def callback(d: dict) -> None:
            preview(d["i"], d["denoised"], d["x"], steps)  # also ComfyUI's cancel point

        x0 = sample(denoiser, noise.to(device), sampler, steps, shift, denoise, init=fmt.process_in(latent).to(device),
                    generator=generator, callback=callback, progress=not comfy.utils.PROGRESS_BAR_ENABLED)
        return io.NodeOutput({"samples": fmt.process_out(x0).to(mm.intermediate_device())})


class SanaSamplerSelect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaSamplerSelect", display_name="Sana Sampler Select", category=CATEGORY,
            description="Sana's solvers as a SAMPLER for SamplerCustomAdvanced: flow_dpmpp_2m (Flow-DPM-Solver), "
                        "flow_euler, scm (Sprint). With SanaScheduler's sigmas they reproduce SanaSampler.",
            inputs=[io.Combo.Input("sampler", options=SAMPLER_NAMES, default="flow_dpmpp_2m")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def validate_inputs(cls, sampler: str) -> bool | str:
        return _check(sampler)

    @classmethod
    def execute(cls, sampler: str) -> io.NodeOutput:
        from .model import SanaKSampler

        return io.NodeOutput(SanaKSampler(SAMPLERS[sampler]))


class SanaScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaScheduler", display_name="Sana Scheduler", category=CATEGORY,
            description="The sigmas each Sana solver uses: the Flow-DPM-Solver or flow-Euler schedule with "
                        "a timestep shift, or Sprint's SCM times. denoise < 1 keeps the last steps of a longer "
                        "schedule, as KSampler does.",
            inputs=[io.Combo.Input("sampler", options=SAMPLER_NAMES, default="flow_dpmpp_2m"),
                    io.Int.Input("steps", default=20, min=1, max=200),
                    io.Float.Input("shift", default=3.0, min=0.1, max=20.0, step=0.1),
                    io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01)],
            outputs=[io.Sigmas.Output()])

    @classmethod
    def validate_inputs(cls, sampler: str) -> bool | str:
        return _check(sampler)

    @classmethod
    def execute(cls, sampler: str, steps: int, shift: float, denoise: float) -> io.NodeOutput:
        from sana_core.samplers import denoise_sigmas

        return io.NodeOutput(denoise_sigmas(sampler, steps, shift, denoise))
