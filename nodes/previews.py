"""Live previews of Sana models under every sampler node (SanaSampler, KSampler, SamplerCustomAdvanced, ...):
full-size TAESANA decodes when models/vae_approx/taesana_decoder.* exists and previews are on (`--preview-method
auto` or `taesd`), else the constant latent-to-RGB map of `SanaLatentFormat` (1/32 of the size).

Every sampler node gets its preview callback from `latent_preview.prepare_callback`, which asks
`latent_preview.get_previewer(device, latent_format)`. Core's TAESD path cannot load TAESANA: 0.3.64's TAESD has
no 32x variant, and core builds it from the latent channels alone (the 8x layout), so a newer core's F32 class
would not be chosen either. So `SanaLatentFormat` names no taesd decoder (core never tries its TAESD on Sana)
and `install` wraps get_previewer once: Sana latent formats get `sana_previewer`, every other model core's.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import latent_preview
import torch
from comfy.cli_args import LatentPreviewMethod, args

from .common import wrap_once

log = logging.getLogger(__name__)
DECODER_NAME = "taesana_decoder"  # models/vae_approx/taesana_decoder.pth or .safetensors
_loaded: dict[tuple, torch.nn.Module] = {}  # the last TAESANA decoder loaded, by (file, mtime, size, device, dtype)


def decoder_file() -> str | None:
    """The TAESANA decoder in the vae_approx folders (core's rule: the first file named taesana_decoder*)."""
    import folder_paths

    name = next((f for f in folder_paths.get_filename_list("vae_approx") if f.startswith(DECODER_NAME)), None)
    return folder_paths.get_full_path("vae_approx", name) if name else None


def load_decoder(path: str, device: torch.device):
    """The TAESANA decoder of `path` on `device` in ComfyUI's VAE dtype there, kept until the file changes."""
    import comfy.model_management as mm
    import comfy.ops

    from ..sana_core.taesana import load_taesana

    from .common import eager_ops

    dtype = mm.vae_dtype(device, [torch.float16, torch.bfloat16, torch.float32])
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size, str(device), dtype)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = load_taesana(decoder=path, dtype=dtype, device=device,
                                    ops=eager_ops(comfy.ops.disable_weight_init))
    return _loaded[key]


class TAESANAPreviewer(latent_preview.LatentPreviewer):
    """The first image of a step's x0 (scaled Sana latents, as samplers hand them) decoded by TAESANA."""

    def __init__(self, decoder: torch.nn.Module):
        from ..sana_core.previews import previewer

        self.preview = previewer(decoder)

    def decode_latent_to_preview(self, x0: torch.Tensor):
        image = self.preview(x0[:1])[0].movedim(0, -1)        # (H, W, 3) in 0..1
        return latent_preview.preview_to_image(image * 2 - 1)  # which takes -1..1


def sana_previewer(device: torch.device, latent_format) -> latent_preview.LatentPreviewer | None:
    """None with previews off; TAESANA with auto/taesd and the decoder file; else the latent-to-RGB map."""
    method = args.preview_method
    if method == LatentPreviewMethod.NoPreviews:
        return None
    if method in (LatentPreviewMethod.Auto, LatentPreviewMethod.TAESD):
        path = decoder_file()
        if path:
            return TAESANAPreviewer(load_decoder(path, device))
        if method == LatentPreviewMethod.TAESD:
            log.warning("Sana: TAESD previews are on but models/vae_approx has no %s.pth/.safetensors "
                        "(github.com/madebyollin/taesd); previewing with the latent-to-RGB map (1/32 size)",
                        DECODER_NAME)
    return latent_preview.Latent2RGBPreviewer(latent_format.latent_rgb_factors, latent_format.latent_rgb_factors_bias)


def install() -> None:
    """Wrap `latent_preview.get_previewer` (once) so that Sana's latent format gets `sana_previewer`."""
    wrap_once(latent_preview, "get_previewer", _with_sana_previewer)


def _with_sana_previewer(core: Callable) -> Callable:
    def get_previewer(device, latent_format, *rest, **options):
        from .model import SanaLatentFormat

        if isinstance(latent_format, SanaLatentFormat):
            return sana_previewer(device, latent_format)
        return core(device, latent_format, *rest, **options)

    return get_previewer
