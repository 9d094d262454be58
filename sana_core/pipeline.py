"""The user-facing Python API, in the spirit of NVlabs' `SanaPipeline`:

    pipe = SanaPipeline.from_pretrained("Efficient-Large-Model/Sana_1600M_1024px_diffusers")
    images = pipe("a cyberpunk cat", height=1024, width=1024, guidance_scale=4.5, seed=42)
    images[0].save("cat.png")   # or sana_core.images.save_images(images, "output", settings) with metadata
"""
from __future__ import annotations

import logging
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import hub, precision
from .checkpoints.controlnet import load_controlnet
from .checkpoints.dcae import load_dcae
from .checkpoints.dit import load_dit
from .checkpoints.gemma import load_text_encoder
from .controlnet import Control, SanaControlNet
from .dcae import DCAE, run_finite
from .denoiser import SanaDenoiser, TextCondition, latent_mask, sample
from .images import ImageInput, load_image, load_mask, to_pil
from .dit import SanaDiT
from .offload import offload_blocks
from .previews import previewer, with_previews
from .resolutions import bin_size, resize_and_crop
from .samplers import SAMPLERS, randn
from .spec import ModelSpec, model_spec
from .taesana import TAESANA, load_taesana
from .text_encoder import SanaTextEncoder

log = logging.getLogger(__name__)

DEFAULT_MODEL = "Efficient-Large-Model/Sana_1600M_1024px_diffusers"
#: Where the parts of an NVlabs `.pth` release live (the `.pth` holds only the DiT).
DEFAULT_VAE = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
DEFAULT_TEXT_ENCODER = "Efficient-Large-Model/gemma-2-2b-it"


@dataclass
class GenerationSettings:
    """Everything that decides an image besides the weights and the pictures given, resolved: what was asked, and
    the model's defaults (`spec.ModelSpec`) for what was not."""

    prompt: str
    negative_prompt: str
    height: int                      # pixels made (a bucket's with resolution binning)
    width: int
    num_inference_steps: int
    guidance_scale: float
    pag_scale: float
    pag_layers: tuple[int, ...]
    seed: int | Sequence[int] | None
    sampler: str
    shift: float
    use_chi: bool
    truncate_timesteps: bool
    max_timesteps: float
    intermediate_timesteps: float
    strength: float                  # of an image to start from
    prompts: int                     # number of prompts
    per_prompt: int                  # images per prompt
    asked: tuple[int, int]           # (height, width) of the output

    @property
    def batch(self) -> int:
        return self.prompts * self.per_prompt

    def latent_shape(self, channels: int) -> tuple[int, int, int, int]:
        return (self.batch, channels, self.height // 32, self.width // 32)

    def per_image(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x (N, ...) given once for all images (N = 1, kept), once per prompt (repeated for its images) or once
        per image; ValueError otherwise."""
        n = x.shape[0]
        if n == 1 or n == self.batch:
            return x
        if n == self.prompts:
            return x.repeat_interleave(self.per_prompt, 0)
        raise ValueError(f"{name}: {n} given for {self.prompts} prompt(s) x {self.per_prompt} image(s) each "
                         f"(give 1, {self.prompts} or {self.batch})")

    def validate(self) -> None:
        for name in ("height", "width"):
            v = getattr(self, name)
            if v <= 0 or v % 32:
                lo, hi = max(32, v // 32 * 32), (v // 32 + 1) * 32
                raise ValueError(f"{name}={v} must be a positive multiple of 32 (the DC-AE compresses 32x); "
                                 f"use {lo} or {hi}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={self.num_inference_steps} must be at least 1")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength={self.strength} must be in (0, 1]")


def default_strength(inpainting: bool) -> float:
    """How much of the schedule runs on a picture when no strength is given: 0.6 for image-to-image, 1.0 for
    inpainting (the masked region made from scratch, the rest kept)."""
    return 1.0 if inpainting else 0.6


def pag_layer_indices(layers: Sequence[int | str] | int | str) -> tuple[int, ...]:
    """PAG blocks as indices: ints, or diffusers' `pag_applied_layers` names "transformer_blocks.N" (or "blocks.N",
    "N"); one or several."""
    out = []
    for layer in [layers] if isinstance(layers, (int, str)) else list(layers):
        match = re.fullmatch(r"(?:(?:transformer_)?blocks\.)?(\d+)", layer) if isinstance(layer, str) else None
        if not isinstance(layer, int) and match is None:
            raise ValueError(f"pag_applied_layers: {layer!r} is not a block index nor 'transformer_blocks.N' "
                             "(regular expressions over layer names are not supported)")
        out.append(layer if isinstance(layer, int) else int(match.group(1)))
    return tuple(out)


_RENAMED = {"pag_guidance_scale": "pag_scale", "pag_layers": "pag_applied_layers"}  # old name -> diffusers'


def _renamed(old: dict[str, Any], pag_scale: float, layers: Any) -> tuple[float, Any]:
    """(pag_scale, pag_applied_layers) with the old spellings honoured (FutureWarning); other unknown keywords
    are a TypeError as Python's own."""
    unknown = sorted(set(old) - set(_RENAMED))
    if unknown:
        raise TypeError(f"SanaPipeline.__call__() got unexpected keyword arguments {unknown}")
    for name, new in _RENAMED.items():
        if name in old:
            warnings.warn(f"SanaPipeline: {name}= is deprecated, use {new}= (diffusers' name)", FutureWarning,
                          stacklevel=4)  # the caller of __call__ (under torch.no_grad's wrapper)
    if "pag_guidance_scale" in old:
        if pag_scale:
            raise ValueError("give pag_scale or pag_guidance_scale (its old name), not both")
        pag_scale = old["pag_guidance_scale"]
    if "pag_layers" in old:
        if layers is not None:
            raise ValueError("give pag_applied_layers or pag_layers (its old name), not both")
        layers = old["pag_layers"]
    return pag_scale, layers


def _prompt_lists(prompt: Any, negative: Any, embeds: torch.Tensor | None,
                  neg_embeds: torch.Tensor | None) -> tuple[list[str], list[str]]:
    """The prompts and one negative each (placeholders "" where embeddings are given)."""
    if embeds is not None:
        if prompt is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        prompt = [""] * embeds.shape[0]
    if neg_embeds is not None and negative not in ("", None):
        raise ValueError("give negative_prompt or negative_prompt_embeds, not both")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if not prompts:
        raise ValueError("prompt is empty: give at least one prompt")
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    return prompts, negatives


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
OFFLOAD_DECODE_BYTES = 4 * 2**30  # with offload: the most a DC-AE decode may use (4K decodes in 1536 px tiles)


class SanaPipeline:
    """Text -> Gemma-2 (with the complex human instruction) -> linear DiT + flow sampler -> DC-AE -> images.

    With `offload=True` each model sits on the CPU until its turn (text encoder, DiT, DC-AE) and the DC-AE
    decodes in tiles once a whole image would need more than `OFFLOAD_DECODE_BYTES`, for small GPUs. With
    `offload="blocks"` the DiT's blocks also stay on the CPU and are streamed to the device one ahead of their
    turn (`offload.BlockOffload`: copies overlap compute on CUDA streams), for DiTs larger than the GPU.
    With `compile=True` (or a torch.compile mode from `COMPILE_MODES`) the DiT runs through `torch.compile`
    (compiled on the first generation, and again for a new image size; the time it took is logged); the modes
    with CUDA graphs mark every DiT call as a new graph step.
    """

    def __init__(self, dit: SanaDiT, vae: DCAE, text_encoder: SanaTextEncoder,
                 device: torch.device | str | None = None, offload: bool | str = False,
                 compile: bool | str = False, controlnets: Sequence[SanaControlNet] = (),
                 spec: ModelSpec | None = None):
        self.dit, self.vae, self.text_encoder = dit, vae, text_encoder
        self.controlnets = list(controlnets)
        #: the model's defaults (steps, sampler, shift, CFG, PAG, Sprint times, default size)
        self.spec = spec or model_spec(dit.cfg, latent_scale=vae.cfg.scaling_factor)
        self.device = precision.default_device(device)
        if offload not in (False, True, "blocks"):
            raise ValueError(f"offload={offload!r}: expected False, True or 'blocks'")
        self.offload = offload
        mode = "default" if compile is True else compile or None
        if mode is not None and mode not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: expected True/False or one of {', '.join(COMPILE_MODES)}")
        self.compiled = torch.compile(dit, dynamic=False, mode=None if mode == "default" else mode) if mode else None
        self._cudagraphs = mode in ("reduce-overhead", "max-autotune")
        self._compiled_shapes: set[tuple[int, ...]] = set()
        for m in (dit, vae, text_encoder, *self.controlnets):
            m.to("cpu" if offload else self.device)
        self.blocks = offload_blocks(dit, self.device) if offload == "blocks" else None  # stays attached

    @classmethod
    def from_pretrained(cls, model: str | Path | None = DEFAULT_MODEL, *, dit: str | Path | None = None,
                        vae: str | Path | None = None, text_encoder: str | Path | None = None,
                        torch_dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, variant: str | None = None,
                        use_pe: bool | None = None, offload: bool | str = False,
                        compile: bool | str = False,
                        controlnet: str | Path | Sequence[str | Path] | None = None,
                        dtype: torch.dtype | None = None) -> "SanaPipeline":
        """Load from a diffusers Sana folder or repo (`model`), or from separate files: `dit` (NVlabs `.pth`,
        safetensors or diffusers folder), `vae` (DC-AE) and `text_encoder` (Gemma-2 folder or single file).
        Parts given separately override the folder's; parts missing from both come from the default repos.
        From a hub repo only the parts still needed are fetched, in one precision: `variant` ("fp16", "bf16",
        "none" for full precision; default from `torch_dtype`, see `hub.default_variant`). torch_dtype: the
        weights' dtype (diffusers' name; `dtype`, the old one, still works with a FutureWarning).
        controlnet: one or several Sana ControlNets (NVlabs' combined `.pth` or its repo id, which may also be
        the `dit`: each part is read once; a branch-only file; a diffusers `SanaControlNetModel` folder or file),
        loaded in `torch_dtype`; they act when `pipe(control_image=...)` is given."""
        if dtype is not None:
            warnings.warn("SanaPipeline.from_pretrained: dtype= is deprecated, use torch_dtype= (diffusers' name)",
                          FutureWarning, stacklevel=2)
            torch_dtype = dtype
        dtype = torch_dtype
        variant = hub.default_variant(dtype) if variant is None else hub.check_variant(variant)
        need = [part for part, given in (("transformer", dit), ("vae", vae), ("text_encoder", text_encoder))
                if not given]
        need += ["scheduler"] if need else []  # its flow_shift: the model's default shift
        root = hub.resolve(model, need, variant) if model is not None and need else None
        if root is not None and root.is_file():  # a single DiT file given as the model
            root, dit = None, dit or root
        if root is None and dit is None:
            raise ValueError("give `model` (a diffusers Sana folder or repo id) or `dit` (a DiT checkpoint)")
        dit_path = hub.resolve(dit, variant=variant) if dit else root
        vae_path = hub.resolve(vae or (root if root is not None else DEFAULT_VAE), variant=variant)
        te_path = hub.resolve(text_encoder or (root if root is not None else DEFAULT_TEXT_ENCODER), variant=variant)
        te_dtype = precision.text_encoder_dtype(dtype, precision.default_device(device))
        base = load_dit(dit_path, dtype=dtype, variant=_present(dit_path, variant), use_pe=use_pe)
        refs = [] if controlnet is None else [controlnet] if isinstance(controlnet, (str, Path)) else list(controlnet)
        nets = [load_controlnet(hub.resolve(ref, variant=variant), base=base.cfg, dtype=dtype) for ref in refs]
        dcae = load_dcae(vae_path, dtype=vae_dtype or dtype)
        spec = model_spec(base.cfg, root if root is not None else dit_path, dcae.cfg.scaling_factor)
        return cls(base, dcae, load_text_encoder(te_path, dtype=te_dtype), device=device, offload=offload,
                   compile=compile, controlnets=nets, spec=spec)

    def load_lora(self, path: str | Path, scale: float = 1.0) -> None:
        """Merge a Sana LoRA (diffusers/PEFT, kohya, NVlabs or ComfyUI names; a path, repo file or hf:// URL) into
        the DiT, times `scale`; several add up. In place: load the model again to remove them."""
        from .lora import merge_lora

        n = merge_lora(self.dit, hub.resolve(path), scale)
        log.info("LoRA %s merged at scale %g (%d layers)", path, scale, n)

    #: TAESANA's decoder for full-size `preview_every` previews (`load_preview_decoder`); None: the linear map
    preview_decoder: TAESANA | None = None

    def load_preview_decoder(self, path: str | Path) -> None:
        """TAESANA's decoder (taesana_decoder.pth / .safetensors, github.com/madebyollin/taesd) for full-size
        previews, kept on this pipeline's device (float16 on a GPU, float32 on the CPU; 8.3M weights)."""
        dtype = torch.float32 if self.device.type == "cpu" else torch.float16
        self.preview_decoder = load_taesana(decoder=path, dtype=dtype, device=self.device)

    def _on_device(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` on the device (the DiT with its ControlNets); with offload, every other model on the CPU."""
        group = [model, *self.controlnets] if model is self.dit else [model]
        streamed = self.dit if self.blocks is not None else None  # blocks streamed, the rest kept on the device
        if self.offload:
            for other in (self.dit, self.vae, self.text_encoder, *self.controlnets):
                if all(other is not m for m in group) and other is not streamed:
                    other.to("cpu")
        for m in group:
            if m is not streamed:
                m.to(self.device)
        return model

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in 0..1 -> scaled DC-AE latents (B, 32, H/32, W/32) float32, one image at a time
        (as `decode`: a latent does not depend on the images encoded with it)."""
        vae = self._on_device(self.vae)
        pixels = pixels.to(self.device, torch.float32) * 2 - 1
        return torch.cat([vae.scale(run_finite(vae, "encode", p[None]).float()) for p in pixels])

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None,
                      use_chi: bool = True, chi: str | None = None,
                      max_length: int = 300) -> tuple[TextCondition, TextCondition | None]:
        """Positive prompts with the complex human instruction (if `use_chi`; `chi` replaces Sana's), negatives
        without it, `max_length` caption tokens."""
        te = self._on_device(self.text_encoder)
        cond = TextCondition(*te.encode(list(prompts), use_chi=use_chi, max_length=max_length, chi=chi))
        uncond = None if negative_prompts is None else TextCondition(
            *te.encode(list(negative_prompts), use_chi=False, max_length=max_length))
        return cond, uncond

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        negative_prompt: str | Sequence[str] = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        pag_scale: float = 0.0,
        pag_applied_layers: Sequence[int | str] | int | str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | Sequence[int] | None = None,
        sampler: str | None = None,
        shift: float | None = None,
        num_images_per_prompt: int = 1,
        use_chi: bool = True,
        latents: torch.Tensor | None = None,
        image: ImageInput = None,
        mask_image: ImageInput = None,
        strength: float | None = None,
        output_type: str = "pil",
        progress: bool = True,
        tiled_decode: bool | None = None,
        truncate_timesteps: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        complex_human_instruction: str | Sequence[str] | None = None,
        max_sequence_length: int = 300,
        max_timesteps: float | None = None,
        intermediate_timesteps: float | None = None,
        return_seeds: bool = False,
        use_resolution_binning: bool = False,
        control_image: ImageInput = None,
        controlnet_conditioning_scale: float | Sequence[float] | None = None,
        control_guidance_start: float | Sequence[float] | None = None,
        control_guidance_end: float | Sequence[float] | None = None,
        preview_every: int = 0,
        **deprecated: Any,
    ) -> Any:
        """Generate images. Everything after `prompt` is a keyword (diffusers' names where it has them).

        prompt: one or several; negative_prompt: one for all or one per prompt (encoded without CHI).
        Unset (None) settings are the model's (`self.spec`, filled from its folder: `spec.ModelSpec`):
        height/width (pixels, multiples of 32) its size; num_inference_steps 20 (Sprint 2); sampler
        "flow_dpmpp_2m" (Sprint "scm"; or "flow_euler"); guidance_scale 4.5 (Sprint: its guidance embedder's input);
        shift its scheduler's flow_shift (3.0; 6.0 for the 4K model; the same for every image size);
        truncate_timesteps (feed the DiT int(1000 sigma) as NVlabs and diffusers' DPM-Solver; False: 1000 sigma,
        diffusers' FlowMatchEuler); max_timesteps / intermediate_timesteps (Sprint's SCM times; the middle one for
        2 steps). pag_scale: perturbed-attention guidance (0: off; diffusers' SanaPAGPipeline uses 3.0) on the
        blocks `pag_applied_layers` (ints, or diffusers' "transformer_blocks.N"; default the spec's (8,)).
        generator or seed: the noise is drawn on the CPU, so a seed gives the same image on any device; one
        generator (or seed) draws the whole batch, as diffusers' `generator=`; a list of them (one per image)
        draws each image from its own, so it does not depend on its batch. Neither: a fresh random seed, without
        touching torch's global generator; `return_seeds=True` returns (images, the seed of each image).
        latents: (B, 32, H/32, W/32) initial noise instead.
        image: the picture to start from (image-to-image), mask_image: 1 (white; transparent in a PNG with alpha)
        = repaint (inpainting by latent blending with re-noising: NVlabs' training-free inpainting, ComfyUI's
        noise-mask semantics, at latent resolution): each a file path, a PIL image, a tensor ((N, 3, h, w) in 0..1;
        a mask (N, h, w) or (h, w)) or a list, any size, resized to cover height x width and centre-cropped
        (`images.load_image` / `load_mask`), one for all images, one per prompt or one per image. strength in
        (0, 1]: how much of the schedule runs on `image` (default 0.6, inpainting 1.0: the masked region from
        scratch); without an image it is an error.
        control_image: the hint of each loaded ControlNet (a list with several), taken as `image` is (for the HED
        ControlNets white scribble lines on black); controlnet_conditioning_scale (1.0): strength of each;
        control_guidance_start / end (0.0 / 1.0): the fraction of the steps it acts on (diffusers' rule); all are
        errors without a ControlNet. The hint steers the CFG and PAG branches too.
        output_type: "pil" (list of PIL images), "np", "pt" ((B, 3, H, W) in 0..1), or "latent" (scaled space).
        tiled_decode: None decides from memory; True/False forces. callback: our per-step hook, called before each
        step with the k-diffusion dict (x, i, sigma, denoised); callback_on_step_end: diffusers' hook, called after
        each step as fn(pipe, step, timestep, {"latents": latents}) (it may not replace the latents).
        prompt_embeds / negative_prompt_embeds (B, T, 2304) with their attention masks (B, T) replace the prompts.
        complex_human_instruction: the instruction put before positive prompts (a string, or lines joined by
        newlines as diffusers does); max_sequence_length: caption tokens (300). use_resolution_binning: any
        height/width; the image is made at the model's training bucket nearest in aspect ratio and resized +
        centre-cropped to the size asked, as diffusers' (off by default here: the size asked is the size made).
        preview_every: with a callback, the dict of every N-th step also holds "preview": that step's x0 prediction
        as images, float32 in 0..1 on the CPU: (B, 3, H, W) TAESANA decodes after `load_preview_decoder`, else
        (B, 3, H/32, W/32) from the linear map (`sana_core.previews`). 0: none.
        Old names (`pag_guidance_scale`, `pag_layers`) still work, with a FutureWarning.
        """
        pag_scale, pag_applied_layers = _renamed(deprecated, pag_scale, pag_applied_layers)
        prompts, negatives = _prompt_lists(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        s = self._settings(
            prompts, negatives, height=height, width=width, steps=num_inference_steps, guidance=guidance_scale,
            pag_scale=pag_scale, pag_layers=pag_applied_layers, seed=seed, sampler=sampler, shift=shift,
            use_chi=use_chi, truncate=truncate_timesteps, max_timesteps=max_timesteps,
            intermediate_timesteps=intermediate_timesteps, strength=strength, per_prompt=num_images_per_prompt,
            binning=use_resolution_binning, image=image, mask=mask_image, latents=latents, output_type=output_type,
            chi=complex_human_instruction)
        cond, uncond = self._text(prompts, negatives, s, complex_human_instruction, max_sequence_length,
                                  prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                                  negative_prompt_attention_mask)
        noise, generator, seeds = self._noise(s, generator, seed, latents)
        init, mask = self._start(s, image, mask_image)
        controls = self._controls(s, control_image, controlnet_conditioning_scale, control_guidance_start,
                                  control_guidance_end)
        step_callback, finish = self._step_callback(callback, callback_on_step_end, preview_every)
        x0 = self._sample(s, cond, uncond, noise, generator, init, mask, controls, step_callback, progress)
        finish(x0)
        out = self._output(x0, s, output_type, tiled_decode)
        return (out, seeds) if return_seeds else out

    def _settings(self, prompts: list[str], negatives: list[str], **given: Any) -> GenerationSettings:
        """Phase 1: the run's settings, unset ones from the model's spec, checked before any model runs."""
        spec, g = self.spec, given
        sampler = g["sampler"] or spec.sampler
        steps = spec.steps if g["steps"] is None else g["steps"]
        _warn_unused(sampler, steps, g["max_timesteps"], g["intermediate_timesteps"],
                     g["chi"] is not None and not g["use_chi"])
        if g["output_type"] not in OUTPUT_TYPES:
            raise ValueError(f"output_type={g['output_type']!r}: expected one of {', '.join(OUTPUT_TYPES)}")
        if g["strength"] is not None and g["image"] is None:
            raise ValueError("strength acts on an image to start from: give image= (or leave strength unset)")
        if g["mask"] is not None and g["image"] is None:
            raise ValueError("mask_image needs image: the picture whose masked region is repainted")
        if g["per_prompt"] < 1:
            raise ValueError(f"num_images_per_prompt={g['per_prompt']} must be at least 1")
        height = spec.size if g["height"] is None else g["height"]
        width = spec.size if g["width"] is None else g["width"]
        asked = (height, width)
        if g["binning"]:
            if height <= 0 or width <= 0:
                raise ValueError(f"height={height} and width={width} must be positive")
            if g["image"] is not None or g["latents"] is not None:
                raise ValueError("use_resolution_binning makes the image at another size: give image/mask_image/"
                                 "latents at a size that is a multiple of 32 and turn it off")
            height, width = bin_size(height, width, self.dit.cfg.base_size * 32)
        strength = g["strength"] if g["strength"] is not None else default_strength(g["mask"] is not None)
        s = GenerationSettings(
            prompts[0], negatives[0], height, width, steps, spec.guidance_scale if g["guidance"] is None
            else g["guidance"], g["pag_scale"], pag_layer_indices(spec.pag_layers if g["pag_layers"] is None
                                                                   else g["pag_layers"]),
            g["seed"], sampler, spec.shift if g["shift"] is None else g["shift"], g["use_chi"],
            spec.truncate_timesteps if g["truncate"] is None else g["truncate"],
            spec.max_timesteps if g["max_timesteps"] is None else g["max_timesteps"],
            spec.intermediate_timesteps if g["intermediate_timesteps"] is None else g["intermediate_timesteps"],
            strength, len(prompts), g["per_prompt"], asked)
        s.validate()
        return s

    def _text(self, prompts: list[str], negatives: list[str], s: GenerationSettings, chi: Any, max_length: int,
              embeds: torch.Tensor | None, mask: torch.Tensor | None, neg_embeds: torch.Tensor | None,
              neg_mask: torch.Tensor | None) -> tuple[TextCondition, TextCondition | None]:
        """Phase 2: the captions (B * images per prompt), encoded or given; no negative for Sprint."""
        sprint = self.dit.cfg.guidance_embed
        chi = "\n".join(chi) if chi is not None and not isinstance(chi, str) else chi
        cond = uncond = None
        if embeds is None or (not sprint and neg_embeds is None):
            cond, uncond = self.encode_prompt(prompts, None if sprint else negatives, s.use_chi, chi, max_length)
        if embeds is not None:
            cond = _given(embeds, mask, "prompt")
        if neg_embeds is not None and not sprint:
            uncond = _given(neg_embeds, neg_mask, "negative_prompt")
        return cond.repeat(s.per_prompt), uncond and uncond.repeat(s.per_prompt)

    def _noise(self, s: GenerationSettings, generator: Any, seed: Any,
               latents: torch.Tensor | None) -> tuple[torch.Tensor, Any, list[int | None]]:
        """Phase 3: the initial noise (B, 32, H/32, W/32) float32 on the CPU, its generator(s) and seeds."""
        generator, seeds = _generators(generator, seed, s.batch)
        if latents is None:
            return randn(s.latent_shape(self.dit.cfg.in_channels), generator), generator, seeds
        if tuple(latents.shape) != s.latent_shape(self.dit.cfg.in_channels):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected "
                             f"{s.latent_shape(self.dit.cfg.in_channels)}")
        return latents, generator, seeds

    def _start(self, s: GenerationSettings, image: ImageInput,
               mask_image: ImageInput) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Phase 4a: the picture to start from as scaled latents (B, 32, h, w) and the inpainting mask at latent
        size (B or 1, 1, h, w), or None."""
        if image is None:
            return None, None
        pixels = s.per_image(load_image(image, height=s.height, width=s.width), "image")
        init = self._encode_pixels(pixels).expand(s.batch, -1, -1, -1)
        if mask_image is None:
            return init, None
        mask = s.per_image(load_mask(mask_image, height=s.height, width=s.width), "mask_image")
        return init, latent_mask(mask, (s.height // 32, s.width // 32)).to(self.device)

    def _controls(self, s: GenerationSettings, control_image: ImageInput, scale: Any, start: Any,
                  end: Any) -> list[Control]:
        """Phase 4b: each ControlNet's `Control`: its image as `image` is taken, DC-AE-encoded; scale/start/end
        one for all or one per ControlNet (defaults 1.0, 0.0, 1.0)."""
        n = len(self.controlnets)
        if not n:
            given = [name for name, v in (("control_image", control_image), ("controlnet_conditioning_scale", scale),
                                          ("control_guidance_start", start), ("control_guidance_end", end))
                     if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} act on a ControlNet, and this pipeline has none: "
                                 "SanaPipeline.from_pretrained(..., controlnet=PATH)")
            return []
        if control_image is None:
            raise ValueError(f"this pipeline has {n} ControlNet(s): give control_image (one per ControlNet)")
        images = list(control_image) if isinstance(control_image, (list, tuple)) and n > 1 else [control_image]
        if len(images) != n:
            raise ValueError(f"control_image: {len(images)} images for {n} ControlNets (give a list, one each)")

        def each(value: Any, name: str, default: float) -> list[float]:
            value = default if value is None else value
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise ValueError(f"{name}: {len(values)} values for {n} ControlNets")
            return [float(v) for v in values]

        return [Control(net, self._encode_pixels(s.per_image(load_image(im, height=s.height, width=s.width,
                                                                         name="control_image"), "control_image")),
                        a, b, c)
                for net, im, a, b, c in zip(self.controlnets, images, each(scale, "controlnet_conditioning_scale", 1.0),
                                            each(start, "control_guidance_start", 0.0),
                                            each(end, "control_guidance_end", 1.0))]

    def _step_callback(self, callback: Callable | None, on_step_end: Callable | None,
                       preview_every: int) -> tuple[Callable | None, Callable[[torch.Tensor], None]]:
        """(the k-diffusion callback the sampler calls before each step, what to call with the sampled x0).
        Ours (with previews) runs before each step; diffusers' `callback_on_step_end` after each: at the start of
        the next step (whose input is that step's result) and, for the last, with x0."""
        if preview_every:
            if callback is None:
                raise ValueError("preview_every needs a callback: the callback is what receives the previews")
            callback = with_previews(callback, preview_every, previewer(self.preview_decoder))
        if on_step_end is None:
            return callback, lambda x0: None
        sigmas: list[torch.Tensor] = []

        def step(d: dict) -> None:
            if d["i"] > 0:
                self._step_end(on_step_end, d["i"] - 1, sigmas[-1], d["x"])
            sigmas.append(d["sigma"])
            if callback is not None:
                callback(d)

        return step, lambda x0: self._step_end(on_step_end, len(sigmas) - 1, sigmas[-1], x0)

    def _step_end(self, fn: Callable[..., Any], i: int, sigma: torch.Tensor, latents: torch.Tensor) -> None:
        """diffusers' `callback_on_step_end(pipe, step, timestep, {"latents": ...})` for step i (the DiT's
        timestep of its sigma); replacing the latents is not supported, so it is an error, not ignored."""
        out = fn(self, i, self.dit.timestep(torch.as_tensor(sigma).reshape(1).float()), {"latents": latents})
        if isinstance(out, dict) and out.get("latents", latents) is not latents:
            raise ValueError("callback_on_step_end returned new latents: this pipeline cannot replace them mid-run "
                             "(return the callback_kwargs it was given)")

    def _sample(self, s: GenerationSettings, cond: TextCondition, uncond: TextCondition | None,
                noise: torch.Tensor, generator: Any, init: torch.Tensor | None, mask: torch.Tensor | None,
                controls: list[Control], callback: Callable | None, progress: bool) -> torch.Tensor:
        """Phase 5: the sampler over the DiT (and its ControlNets) -> x0 (B, 32, h, w), scaled latent space."""
        self._on_device(self.dit)
        denoiser = SanaDenoiser(self.dit if self.compiled is None else self.compiled, cond, uncond,
                                s.guidance_scale, s.pag_scale, s.pag_layers, truncate_timesteps=s.truncate_timesteps,
                                cudagraph_steps=self._cudagraphs, controls=controls)
        shape = tuple(noise.shape)
        started, new_shape = time.perf_counter(), self.compiled is not None and shape not in self._compiled_shapes
        x0 = sample(denoiser, noise.to(self.device), s.sampler, s.num_inference_steps, s.shift,
                    denoise=s.strength if init is not None else 1.0, init=init, generator=generator,
                    callback=callback, progress=progress, mask=mask, max_timesteps=s.max_timesteps,
                    intermediate_timesteps=s.intermediate_timesteps)
        if new_shape:
            self._compiled_shapes.add(shape)
            log.info("torch.compile: sampling at %s, compilation included, took %.1f s", shape,
                     time.perf_counter() - started)
        return x0

    def _output(self, x0: torch.Tensor, s: GenerationSettings, output_type: str, tiled: bool | None) -> Any:
        """Phase 6: the latents as asked: decoded (at the size asked) to "pt" / "np" / "pil", or as they are."""
        if output_type == "latent":
            return x0
        images = self.decode(x0, tiled=tiled, size=s.asked)
        if output_type == "np":
            return images.permute(0, 2, 3, 1).cpu().numpy()
        return to_pil(images) if output_type == "pil" else images

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool | None = None,
               size: tuple[int, int] | None = None) -> torch.Tensor:
        """Scaled latents (B, 32, h, w) -> images (B, 3, 32h, 32w) float32 in 0..1 (resized and centre-cropped to
        `size` = (height, width) when given, before the clamp, as diffusers' resolution binning).

        One image at a time: an image does not depend on the latents decoded with it (a CPU convolution rounds
        otherwise in another batch), and the peak memory is one image's. A float16 DC-AE that overflows is
        converted to bfloat16 (with a warning) and the decode repeated (`dcae.run_finite`)."""
        vae = self._on_device(self.vae)
        z = latents.to(self.device) / vae.cfg.scaling_factor
        budget = OFFLOAD_DECODE_BYTES if self.offload else None
        image = torch.cat([run_finite(vae, "decode", z[i:i + 1], tiled=tiled, max_memory=budget).float()
                           for i in range(z.shape[0])])
        if size is not None:
            image = resize_and_crop(image, *size)
        return (image / 2 + 0.5).clamp(0, 1)


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _present(path: Path, variant: str | None) -> str | None:
    """`variant` if a folder holds its files (else the loader takes whatever precision is there)."""
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    return variant if variant and path.is_dir() and any(folder.glob(f"*.{variant}*.safetensors*")) else None


def _warn_unused(sampler: str, steps: int, max_timesteps: float | None, intermediate: float | None,
                 chi_off: bool) -> None:
    """Say so when a setting given (not None) cannot act (nothing passes silently)."""
    if sampler != "scm" and (max_timesteps is not None or intermediate is not None):
        log.warning("max_timesteps / intermediate_timesteps only act on the scm sampler (Sana-Sprint), not %s", sampler)
    elif sampler == "scm" and steps != 2 and intermediate is not None:
        log.warning("intermediate_timesteps only acts on 2-step Sprint runs (this one has %d steps)", steps)
    if chi_off:
        log.warning("complex_human_instruction is not used: use_chi is off")


def random_seed() -> int:
    """A fresh seed from the OS, leaving torch's global generator alone."""
    return int.from_bytes(os.urandom(8), "little") % 2**63


def _generators(generator: Any, seed: Any, batch: int) -> tuple[Any, list[int | None]]:
    """(generator or list of per-image generators, the seed of each image; None where a generator was given)."""
    if generator is not None:
        return generator, [None] * batch
    seed = random_seed() if seed is None else seed
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"{len(seed)} seeds for {batch} images")
        return [torch.Generator().manual_seed(int(s)) for s in seed], [int(s) for s in seed]
    return torch.Generator().manual_seed(int(seed)), [int(seed)] * batch


def _given(embeds: torch.Tensor, mask: torch.Tensor | None, name: str) -> TextCondition:
    """Caption embeddings passed in (diffusers' `prompt_embeds` and `prompt_attention_mask`)."""
    if embeds.ndim != 3:
        raise ValueError(f"{name}_embeds: expected (batch, tokens, 2304), got {tuple(embeds.shape)}")
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    if tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise ValueError(f"{name}_attention_mask: expected {tuple(embeds.shape[:2])}, got {tuple(mask.shape)}")
    return TextCondition(embeds, mask.long())
