"""The user-facing Python API, in the spirit of NVlabs' `SanaPipeline`:

    pipe = SanaPipeline.from_pretrained("Efficient-Large-Model/Sana_1600M_1024px_diffusers")
    images = pipe("a cyberpunk cat", height=1024, width=1024, guidance_scale=4.5, seed=42)
    save_images(images, "output", prompts=["a cyberpunk cat"])
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from . import hub, precision
from .checkpoints.controlnet import load_controlnet
from .checkpoints.dcae import load_dcae
from .checkpoints.dit import load_dit
from .checkpoints.gemma import load_text_encoder
from .controlnet import Control, SanaControlNet
from .dcae import DCAE, run_finite
from .denoiser import SanaDenoiser, TextCondition, latent_mask, sample
from .dit import SanaDiT
from .offload import offload_blocks
from .previews import previewer, with_previews
from .resolutions import bin_size, resize_and_crop
from .samplers import SAMPLERS, randn
from .spec import ModelSpec, model_spec
from .taesana import TAESANA, load_taesana
from .text_encoder import SanaTextEncoder

if TYPE_CHECKING:
    from PIL.PngImagePlugin import PngInfo

log = logging.getLogger(__name__)

DEFAULT_MODEL = "Efficient-Large-Model/Sana_1600M_1024px_diffusers"
#: Where the parts of an NVlabs `.pth` release live (the `.pth` holds only the DiT).
DEFAULT_VAE = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
DEFAULT_TEXT_ENCODER = "Efficient-Large-Model/gemma-2-2b-it"


@dataclass
class GenerationSettings:
    """Everything that decides an image besides the weights (stored in the PNG metadata). None: the model's
    default (`spec.ModelSpec`), not known before it is loaded."""

    prompt: str
    negative_prompt: str
    height: int | None
    width: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    pag_guidance_scale: float
    pag_layers: tuple[int, ...] | None
    seed: int | None
    sampler: str | None
    shift: float | None
    use_chi: bool

    def validate(self) -> None:
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % 32):
                lo, hi = max(32, v // 32 * 32), (v // 32 + 1) * 32
                raise ValueError(f"{name}={v} must be a positive multiple of 32 (the DC-AE compresses 32x); "
                                 f"use {lo} or {hi}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={self.num_inference_steps} must be at least 1")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")


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
                 compile: bool | str = False, controlnets: Sequence[SanaControlNet] = (), spec: ModelSpec | None = None):
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
                        dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, variant: str | None = None,
                        use_pe: bool | None = None, offload: bool | str = False,
                        compile: bool | str = False,
                        controlnet: str | Path | Sequence[str | Path] | None = None) -> "SanaPipeline":
        """Load from a diffusers Sana folder or repo (`model`), or from separate files: `dit` (NVlabs `.pth`,
        safetensors or diffusers folder), `vae` (DC-AE) and `text_encoder` (Gemma-2 folder or single file).
        Parts given separately override the folder's; parts missing from both come from the default repos.
        From a hub repo only the parts still needed are fetched, in one precision: `variant` ("fp16", "bf16",
        "none" for full precision; default from `dtype`, see `hub.default_variant`).
        controlnet: one or several Sana ControlNets (NVlabs' combined `.pth` or its repo id, which may also be
        the `dit`: each part is read once; a branch-only file; a diffusers `SanaControlNetModel` folder or file),
        loaded in `dtype`; they act when `pipe(control_image=...)` is given."""
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

    def _controls(self, control_image: Any, scale: Any, start: Any, end: Any, height: int, width: int,
                  batch: int, per_prompt: int) -> list[Control]:
        """Each ControlNet's `Control`: its image resized (bicubic) + centre-cropped to the output size as NVlabs'
        app does, DC-AE-encoded; scale/start/end one for all or one per ControlNet."""
        n = len(self.controlnets)
        if control_image is None:
            if n:
                raise ValueError(f"this pipeline has {n} ControlNet(s): give control_image (one per ControlNet)")
            if (scale, start, end) != (1.0, 0.0, 1.0):
                log.warning("controlnet_conditioning_scale / control_guidance_start / end act only with a ControlNet "
                            "and control_image; this pipeline was loaded without one")
            return []
        if not n:
            raise ValueError("control_image needs a ControlNet: SanaPipeline.from_pretrained(..., controlnet=PATH)")
        images = list(control_image) if isinstance(control_image, (list, tuple)) and n > 1 else [control_image]

        def each(value: Any, name: str) -> list[float]:
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise ValueError(f"{name}: {len(values)} values for {n} ControlNets")
            return [float(v) for v in values]

        if len(images) != n:
            raise ValueError(f"control_image: {len(images)} images for {n} ControlNets (give a list, one each)")
        controls = []
        for net, image, s, a, b in zip(self.controlnets, images, each(scale, "controlnet_conditioning_scale"),
                                       each(start, "control_guidance_start"), each(end, "control_guidance_end")):
            pixels = control_pixels(image, height, width)
            if pixels.shape[0] not in (1, batch // per_prompt, batch):
                raise ValueError(f"control_image: {pixels.shape[0]} images for {batch // per_prompt} prompts")
            if 1 < pixels.shape[0] < batch:
                pixels = pixels.repeat_interleave(per_prompt, 0)
            controls.append(Control(net, self._encode_pixels(pixels), s, a, b))
        return controls

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
        negative_prompt: str | Sequence[str] = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        pag_guidance_scale: float = 0.0,
        pag_layers: Sequence[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | Sequence[int] | None = None,
        sampler: str | None = None,
        shift: float | None = None,
        num_images_per_prompt: int = 1,
        use_chi: bool = True,
        latents: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        mask_image: torch.Tensor | None = None,
        strength: float = 1.0,
        output_type: str = "pil",
        progress: bool = True,
        tiled_decode: bool | None = None,
        truncate_timesteps: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
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
        control_image: Any = None,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        preview_every: int = 0,
    ) -> Any:
        """Generate images.

        prompt: one or several; negative_prompt: one for all or one per prompt (encoded without CHI).
        height/width: pixels, multiples of 32. sampler: "flow_dpmpp_2m" (default), "flow_euler", or "scm"
        (the default for Sprint models, 1-4 steps). Unset (None) settings are the model's (`self.spec`, filled
        from its folder: `spec.ModelSpec`): height/width its size, num_inference_steps 20 (Sprint 2), sampler,
        guidance_scale 4.5, pag_layers (8,), shift its scheduler's flow_shift (3.0; 6.0 for the 4K model, for
        every image size), truncate_timesteps, max_timesteps / intermediate_timesteps.
        generator or seed: the noise is drawn on the CPU, so a seed gives the same image on any device; one
        generator (or seed) draws the whole batch, as diffusers' `generator=`; a list of them (one per image)
        draws each image from its own, so it does not depend on its batch. Neither: a fresh random seed, without
        touching torch's global generator; `return_seeds=True` returns (images, the seed of each image).
        latents: (B, 32, H/32, W/32) initial noise instead. image: (B, 3, H, W) in 0..1 to start from
        (image-to-image) and strength in (0, 1]: how much of the schedule runs on it. mask_image: (B, H, W) or
        (H, W) in 0..1, 1 (white) = repaint: inpainting of `image` by latent blending with re-noising (NVlabs'
        training-free inpainting; ComfyUI's noise-mask semantics, so SanaSampler gives the same image), at
        latent resolution (32 px); strength 1 repaints the masked region from scratch. output_type: "pil" (list of
        PIL images), "pt" ((B, 3, H, W) in 0..1), or "latent" (the sampled latent, scaled space).
        tiled_decode: None decides from memory; True/False forces. callback: called each step (k-diffusion dict).
        truncate_timesteps: feed the DiT int(1000 * sigma) as NVlabs' model does (and diffusers' DPM-Solver);
        False feeds 1000 * sigma (diffusers' FlowMatchEuler). prompt_embeds / negative_prompt_embeds (B, T, 2304)
        with their attention masks (B, T) replace the prompts (diffusers' names). complex_human_instruction: the
        instruction put before positive prompts (a string, or lines joined by newlines as diffusers does);
        max_sequence_length: caption tokens (300). max_timesteps / intermediate_timesteps: Sana-Sprint's SCM
        times (intermediate is used with 2 steps). use_resolution_binning: any height/width; the image is made at
        the model's training bucket nearest in aspect ratio and resized + centre-cropped to the size asked, as
        diffusers' `use_resolution_binning` (off by default here: the size asked is the size made).
        control_image: the hint of each loaded ControlNet (a list with several): a ready control image (for the
        HED ControlNets white scribble lines on black), as a PIL image, a file path or a tensor (N, 3, h, w) in
        0..1 of any size, resized (bicubic) + centre-cropped to height x width, one for all images or one per
        prompt; controlnet_conditioning_scale: strength of each; control_guidance_start / end: the fraction of
        the steps it acts on (diffusers' names and rule). The hint steers the CFG and PAG branches too.
        preview_every: with a callback, the dict of every N-th step also holds "preview": that step's x0 prediction
        as images, float32 in 0..1 on the CPU: (B, 3, H, W) TAESANA decodes after `load_preview_decoder`, else
        (B, 3, H/32, W/32) from the linear map (`sana_core.previews`). 0: none.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: expected one of {', '.join(OUTPUT_TYPES)}")
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("give prompt or prompt_embeds, not both")
            prompt = [""] * prompt_embeds.shape[0]
        if negative_prompt_embeds is not None and negative_prompt not in ("", None):
            raise ValueError("give negative_prompt or negative_prompt_embeds, not both")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if not prompts:
            raise ValueError("prompt is empty: give at least one prompt")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        sprint, spec = self.dit.cfg.guidance_embed, self.spec
        _warn_unused(sampler or spec.sampler, spec.steps if num_inference_steps is None else num_inference_steps,
                     max_timesteps, intermediate_timesteps, complex_human_instruction is not None and not use_chi)
        height = spec.size if height is None else height
        width = spec.size if width is None else width
        num_inference_steps = spec.steps if num_inference_steps is None else num_inference_steps
        sampler = sampler or spec.sampler
        guidance_scale = spec.guidance_scale if guidance_scale is None else guidance_scale
        pag_layers = spec.pag_layers if pag_layers is None else pag_layers
        shift = spec.shift if shift is None else shift
        truncate_timesteps = spec.truncate_timesteps if truncate_timesteps is None else truncate_timesteps
        max_timesteps = spec.max_timesteps if max_timesteps is None else max_timesteps
        if intermediate_timesteps is None:
            intermediate_timesteps = spec.intermediate_timesteps
        asked = (height, width)
        if use_resolution_binning:
            if height <= 0 or width <= 0:
                raise ValueError(f"height={height} and width={width} must be positive")
            if image is not None or mask_image is not None or latents is not None:
                raise ValueError("use_resolution_binning makes the image at another size: give image/mask_image/"
                                 "latents at a size that is a multiple of 32 and turn it off")
            height, width = bin_size(height, width, self.dit.cfg.base_size * 32)
        settings = GenerationSettings(prompts[0], negatives[0], height, width, num_inference_steps, guidance_scale,
                                      pag_guidance_scale, tuple(pag_layers), seed, sampler, shift, use_chi)
        settings.validate()

        chi = complex_human_instruction
        chi = "\n".join(chi) if chi is not None and not isinstance(chi, str) else chi
        cond = uncond = None
        if prompt_embeds is None or (not sprint and negative_prompt_embeds is None):
            cond, uncond = self.encode_prompt(prompts, None if sprint else negatives, use_chi, chi,
                                              max_sequence_length)
        if prompt_embeds is not None:
            cond = _given(prompt_embeds, prompt_attention_mask, "prompt")
        if negative_prompt_embeds is not None and not sprint:
            uncond = _given(negative_prompt_embeds, negative_prompt_attention_mask, "negative_prompt")
        cond, uncond = cond.repeat(num_images_per_prompt), uncond and uncond.repeat(num_images_per_prompt)
        B = len(prompts) * num_images_per_prompt
        shape = (B, self.dit.cfg.in_channels, height // 32, width // 32)
        generator, seeds = _generators(generator, seed, B)
        if latents is None:
            latents = randn(shape, generator)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")

        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image: the picture whose masked region is repainted")
        init = mask = None
        if image is not None:
            if tuple(image.shape[-2:]) != (height, width) or image.shape[0] not in (1, B):
                raise ValueError(f"image has shape {tuple(image.shape)}, expected (1 or {B}, 3, {height}, {width})")
            init = self._encode_pixels(image).expand(B, -1, -1, -1)
            if mask_image is not None:
                mask_image = torch.as_tensor(mask_image)
                if tuple(mask_image.shape[-2:]) != (height, width):
                    raise ValueError(f"mask_image has shape {tuple(mask_image.shape)}, expected ({height}, {width})")
                mask = latent_mask(mask_image, shape[-2:]).to(self.device)
        controls = self._controls(control_image, controlnet_conditioning_scale, control_guidance_start,
                                  control_guidance_end, height, width, B, num_images_per_prompt)
        self._on_device(self.dit)
        denoiser = SanaDenoiser(self.dit if self.compiled is None else self.compiled, cond, uncond, guidance_scale,
                                pag_guidance_scale, tuple(pag_layers), truncate_timesteps=truncate_timesteps,
                                cudagraph_steps=self._cudagraphs, controls=controls)
        if preview_every:
            if callback is None:
                raise ValueError("preview_every needs a callback: the callback is what receives the previews")
            callback = with_previews(callback, preview_every, previewer(self.preview_decoder))
        started, new_shape = time.perf_counter(), self.compiled is not None and shape not in self._compiled_shapes
        x0 = sample(denoiser, latents.to(self.device), sampler, num_inference_steps, shift,
                    denoise=strength if image is not None else 1.0, init=init, generator=generator,
                    callback=callback, progress=progress, mask=mask, max_timesteps=max_timesteps,
                    intermediate_timesteps=intermediate_timesteps)
        if new_shape:
            self._compiled_shapes.add(shape)
            log.info("torch.compile: sampling at %s, compilation included, took %.1f s", shape,
                     time.perf_counter() - started)
        out = x0 if output_type == "latent" else self.decode(x0, tiled=tiled_decode, size=asked)
        if output_type == "np":
            out = out.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type == "pil":
            from PIL import Image

            arrays = (out.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
            out = [Image.fromarray(a) for a in arrays]
        return (out, seeds) if return_seeds else out

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


def control_pixels(image: Any, height: int, width: int) -> torch.Tensor:
    """A control image -> (N, 3, height, width) float32 in 0..1: a PIL image, an image file path, or a tensor
    (N, 3, h, w) / (3, h, w) in 0..1 (a grey (N, 1, h, w) one is repeated to RGB), resized (bicubic) to cover the
    size and centre-cropped, as NVlabs' ControlNet app prepares its HED scribbles."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"control_image {str(image)!r}: not a readable image file ({e})") from e
    if isinstance(image, Image.Image):
        image = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4) or image.shape[-3] not in (1, 3):
        what = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"control_image: expected a PIL image, an image file path or a (N, 3, H, W) tensor in "
                         f"0..1, got {what}")
    image = image.float().reshape(-1, *image.shape[-3:]).expand(-1, 3, -1, -1)
    return resize_and_crop(image, height, width, mode="bicubic").clamp(0, 1)


def load_image(path: str | Path, width: int, height: int, mask: bool = False) -> torch.Tensor:
    """An image file resized to cover width x height (Lanczos) and centre-cropped: (1, 3, H, W) in 0..1, or with
    `mask` the mask (H, W) in 0..1 from its luminance, white = repaint (alpha used instead when it has one)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if mask:
            im = im.getchannel("A").point(lambda a: 255 - a) if "A" in im.getbands() else im.convert("L")
        else:
            im = im.convert("RGB")
        im = ImageOps.fit(im, (width, height), Image.Resampling.LANCZOS)
    import numpy as np

    t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    return t if mask else t.permute(2, 0, 1)[None]


def png_metadata(settings: dict[str, Any]) -> PngInfo:
    """PNG text chunks: the prompt, and every setting as JSON under "sana"."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", str(settings.get("prompt", "")))
    info.add_text("sana", json.dumps(settings, default=str))
    return info


def save_images(images: Sequence, folder: str | Path, settings: Sequence[dict[str, Any]] | None = None,
                names: Sequence[str] | None = None) -> list[Path]:
    """Write PIL images as PNGs into `folder` (created), with each one's settings in its PNG text chunks.

    Existing files are never overwritten: names get a counter instead.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        stem = names[i] if names else f"sana_{i:05d}"
        path, k = folder / f"{stem}.png", 1
        while path.exists():
            path, k = folder / f"{stem}_{k}.png", k + 1
        meta = settings[i] if settings else {}
        image.save(path, pnginfo=png_metadata(meta))
        paths.append(path)
    return paths
