"""Sampling nodes. SanaSampler runs Sana's solvers on ComfyUI's own sampling path (CFGGuider + our SAMPLER and
SIGMAS), so everything wired into it keeps the host's meaning: noise masks (inpainting), several or
area/masked conditionings, timestep ranges, shift nodes, batch_index, model patches. SanaPAG gives the same
perturbed-attention guidance to any sampler; SanaSamplerSelect / SanaScheduler expose the solvers and schedules
for SamplerCustomAdvanced."""
from __future__ import annotations

import logging
import math

from comfy_api.latest import io

from ..sana_core.samplers import SAMPLERS
from ..sana_core.spec import SANA, SPRINT

from .common import CATEGORY, check_widgets

log = logging.getLogger(__name__)
SAMPLER_NAMES = list(SAMPLERS)
PAG_LAYERS = ", ".join(map(str, SANA.pag_layers))  # widget text of the default PAG blocks
STEPS_TIP = f"{SANA.steps} for Sana, 1-4 for Sprint ({SPRINT.steps} by default)"
SHIFT_TIP = ("timestep shift of the schedule; 0: the model's (its scheduler's flow_shift: 3.0, 6.0 for 4K, for "
             "every size; or what a ModelSamplingSD3/AuraFlow node set). The scm sampler (Sprint) has no shift")
SAMPLER_TIP = "flow_dpmpp_2m: Flow-DPM-Solver (Sana's default); flow_euler; scm: Sana-Sprint (1-4 steps)"
DENOISE_TIP = "1: from noise; < 1: the last steps of a longer schedule, starting from the input latent"


def parse_layers(text: str, field: str = "pag_layers") -> tuple[int, ...]:
    """"8" or "7, 8" -> block indices; ValueError naming the field otherwise."""
    try:
        layers = tuple(int(p) for p in text.replace(",", " ").split())
    except ValueError:
        layers = ()
    if not layers:
        raise ValueError(f"{field}: expected block numbers such as '8' or '7, 8', got {text!r}")
    return layers


def check_with_layers(node: type[io.ComfyNode], values: dict, field: str) -> bool | str:
    """`check_widgets`, and the PAG layer list in `field` parsed."""
    checked = check_widgets(node, values)
    if checked is True and isinstance(values.get(field), str):
        try:
            parse_layers(values[field], field)
        except ValueError as e:
            return str(e)
    return checked


def resolve_shift(model, shift: float, sampler: str) -> float:
    """The shift a Sana solver's schedule uses: the widget's when > 0, else the model's (the loader's default or
    a shift node's). scm (Sprint) has none, so a shift there is an error, not ignored."""
    from .patches import check_flow

    sampling = model.get_model_object("model_sampling")
    check_flow(sampling)
    patched = "model_sampling" in model.object_patches  # a ModelSamplingSD3/AuraFlow/... node
    if sampler == "scm":
        if shift > 0 or (patched and not math.isclose(float(sampling.shift), 1.0)):
            raise ValueError("shift: the scm sampler (Sana-Sprint) uses Sprint's fixed times and has no shift; set "
                             "shift to 0 and remove the shift node, or use flow_euler")
        return 1.0
    if shift > 0:
        if patched and not math.isclose(float(sampling.shift), shift):
            log.warning("SanaSampler: its shift %.3g replaces the %.3g a model sampling node set", shift,
                        float(sampling.shift))
        return shift
    return float(sampling.shift)


def sprint_guidance(conditioning: list, scale: float) -> list:
    """Sprint takes its guidance scale through an embedder: put `scale` on every entry that has none (a
    FluxGuidance node's value is kept, with a warning that `cfg` does not apply to it)."""
    out = []
    for embeds, extra in conditioning:
        if "guidance" in extra and not math.isclose(float(extra["guidance"]), scale):
            log.warning("SanaSampler: the positive conditioning sets guidance %.3g (FluxGuidance); it is used instead "
                        "of cfg %.3g", float(extra["guidance"]), scale)
            out.append([embeds, extra])
        else:
            out.append([embeds, {**extra, "guidance": scale}])
    return out


def sana_dit(model, node: str):
    dit = model.get_model_object("diffusion_model")
    if not hasattr(dit, "cfg") or not hasattr(dit.cfg, "guidance_embed"):
        raise ValueError(f"{node}: the MODEL is not a Sana model; load it with SanaCheckpointLoader")
    return dit


class SanaSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaSampler", display_name="Sana Sampler", category=CATEGORY,
            description="Samples a Sana MODEL as the sana_core engine (and NVlabs / diffusers) do: Flow-DPM-Solver "
                        "(default), flow Euler, or SCM for Sana-Sprint; CFG on the negative prompt and PAG on chosen "
                        "blocks. Runs on ComfyUI's sampling path, so noise masks (inpainting), combined/area "
                        "conditioning, timestep ranges, shift nodes and model patches apply as with KSampler. "
                        "denoise < 1 starts from the input latent (image-to-image).",
            inputs=[io.Model.Input("model", tooltip="a Sana MODEL"),
                    io.Conditioning.Input("positive", tooltip="from SanaGemmaTextEncode (role positive)"),
                    io.Conditioning.Input("negative", tooltip="from SanaGemmaTextEncode (role negative); unused by "
                                                              "Sprint"),
                    io.Latent.Input("latent_image", tooltip="an empty Sana latent, or an encoded image (with a noise "
                                                            "mask for inpainting)"),
                    io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                                 tooltip="the noise (and Sprint's re-noising) come from this seed"),
                    io.Int.Input("steps", default=SANA.steps, min=1, max=200, tooltip=STEPS_TIP),
                    io.Float.Input("cfg", default=SANA.guidance_scale, min=0.0, max=30.0, step=0.1, round=0.01,
                                   tooltip="guidance scale; <= 1 runs no negative branch (as diffusers); Sprint: fed "
                                           "to its guidance embedder"),
                    io.Float.Input("pag_scale", default=0.0, min=0.0, max=20.0, step=0.1, round=0.01,
                                   tooltip="perturbed-attention guidance; 0 turns it off"),
                    io.String.Input("pag_layers", default=PAG_LAYERS,
                                    tooltip="blocks whose self-attention PAG perturbs"),
                    io.Float.Input("shift", default=0.0, min=0.0, max=20.0, step=0.1, tooltip=SHIFT_TIP),
                    io.Combo.Input("sampler", options=SAMPLER_NAMES, default="flow_dpmpp_2m", tooltip=SAMPLER_TIP),
                    io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=DENOISE_TIP)],
            outputs=[io.Latent.Output(tooltip="the sampled latent")])

    @classmethod
    def validate_inputs(cls, cfg: float | None = None, pag_scale: float | None = None, shift: float | None = None,
                        denoise: float | None = None, pag_layers: str | None = None) -> bool | str:
        return check_with_layers(cls, {"cfg": cfg, "pag_scale": pag_scale, "shift": shift, "denoise": denoise,
                                       "pag_layers": pag_layers}, "pag_layers")

    @classmethod
    def execute(cls, model, positive, negative, latent_image: dict, seed: int, steps: int, cfg: float,
                pag_scale: float, pag_layers: str, shift: float, sampler: str, denoise: float) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.sample
        import comfy.samplers
        import comfy.utils
        import latent_preview

        from ..sana_core.samplers import denoise_sigmas

        from .patches import add_pag

        dit = sana_dit(model, "SanaSampler")
        latent = latent_image["samples"]
        if latent.ndim != 4 or latent.shape[1] != dit.cfg.in_channels:
            raise ValueError(f"SanaSampler: latent_image must be a Sana latent (B, 32, H/32, W/32), got "
                             f"{tuple(latent.shape)}; use SanaEmptyLatentImage or a VAE encode with the DC-AE")
        sigmas = denoise_sigmas(sampler, steps, resolve_shift(model, shift, sampler), denoise)
        if pag_scale > 0:
            model = add_pag(model, pag_scale, parse_layers(pag_layers))
        if dit.cfg.guidance_embed:  # Sprint: guidance enters through its embedder, no negative branch
            positive, cfg = sprint_guidance(positive, cfg), 1.0
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg if cfg > 1 else 1.0)
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)  # progress, previews, cancel
        samples = guider.sample(noise, latent, comfy.samplers.KSAMPLER(SAMPLERS[sampler]), sigmas,
                                denoise_mask=latent_image.get("noise_mask"), callback=callback,
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = latent_image.copy()
        out["samples"] = samples.to(mm.intermediate_device())
        return io.NodeOutput(out)


class SanaPAG(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaPAG", display_name="Sana PAG (perturbed attention)", category=CATEGORY,
            description="Perturbed-attention guidance for a Sana MODEL under any sampler (KSampler, "
                        "SamplerCustomAdvanced): the positive prompt is run again with the self-attention of the "
                        "chosen blocks replaced by the identity, and the result pushed away from it, as diffusers' "
                        "SanaPAGPipeline and SanaSampler's pag_scale do.",
            inputs=[io.Model.Input("model", tooltip="a Sana MODEL"),
                    io.Float.Input("scale", default=SANA.pag_scale, min=0.0, max=20.0, step=0.1, round=0.01,
                                   tooltip="PAG scale; 0 turns it off"),
                    io.String.Input("layers", default=PAG_LAYERS, tooltip="blocks whose self-attention PAG perturbs")],
            outputs=[io.Model.Output(tooltip="the MODEL with PAG, for any sampler")])

    @classmethod
    def validate_inputs(cls, scale: float | None = None, layers: str | None = None) -> bool | str:
        return check_with_layers(cls, {"scale": scale, "layers": layers}, "layers")

    @classmethod
    def execute(cls, model, scale: float, layers: str) -> io.NodeOutput:
        from .patches import add_pag

        sana_dit(model, "SanaPAG")
        return io.NodeOutput(add_pag(model, scale, parse_layers(layers, "layers")) if scale > 0 else model)


class SanaSamplerSelect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaSamplerSelect", display_name="Sana Sampler Select", category=CATEGORY,
            description="Sana's solvers as a SAMPLER for SamplerCustomAdvanced: flow_dpmpp_2m (Flow-DPM-Solver), "
                        "flow_euler, scm (Sprint). With SanaScheduler's sigmas they reproduce SanaSampler.",
            inputs=[io.Combo.Input("sampler", options=SAMPLER_NAMES, default="flow_dpmpp_2m", tooltip=SAMPLER_TIP)],
            outputs=[io.Sampler.Output(tooltip="for SamplerCustomAdvanced")])

    @classmethod
    def execute(cls, sampler: str) -> io.NodeOutput:
        import comfy.samplers

        return io.NodeOutput(comfy.samplers.KSAMPLER(SAMPLERS[sampler]))


class SanaScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaScheduler", display_name="Sana Scheduler", category=CATEGORY,
            description="The sigmas each Sana solver uses: the Flow-DPM-Solver or flow-Euler schedule with a "
                        "timestep shift, or Sprint's SCM times. denoise < 1 keeps the last steps of a longer "
                        "schedule, as KSampler does. With a model connected, shift 0 takes the model's shift.",
            inputs=[io.Combo.Input("sampler", options=SAMPLER_NAMES, default="flow_dpmpp_2m", tooltip=SAMPLER_TIP),
                    io.Int.Input("steps", default=SANA.steps, min=1, max=200, tooltip=STEPS_TIP),
                    io.Float.Input("shift", default=0.0, min=0.0, max=20.0, step=0.1,
                                   tooltip=SHIFT_TIP + f"; without a model, 0 means {SANA.shift}"),
                    io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=DENOISE_TIP),
                    io.Model.Input("model", optional=True, tooltip="the Sana MODEL, for its shift")],
            outputs=[io.Sigmas.Output(tooltip="the schedule, for SamplerCustomAdvanced")])

    @classmethod
    def validate_inputs(cls, shift: float | None = None, denoise: float | None = None) -> bool | str:
        return check_widgets(cls, {"shift": shift, "denoise": denoise})

    @classmethod
    def execute(cls, sampler: str, steps: int, shift: float, denoise: float, model=None) -> io.NodeOutput:
        from ..sana_core.samplers import denoise_sigmas

        if model is not None:
            shift = resolve_shift(model, shift, sampler)
        elif sampler == "scm" and shift > 0:
            raise ValueError("shift: the scm sampler (Sana-Sprint) has no shift; set it to 0")
        return io.NodeOutput(denoise_sigmas(sampler, steps, shift or SANA.shift, denoise))
