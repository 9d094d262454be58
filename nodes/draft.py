"""TAESANA as a draft Sana VAE: a core `VAE` that decodes and encodes Sana latents approximately, in milliseconds on
a GPU, for quick iteration and for looking at large batches. Core VAEDecode/VAEEncode (and their tiled forms) use
it through core's own code; LATENTs stay raw DC-AE latents, as with the DC-AE loader's VAE."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from .common import CATEGORY

NONE = "none"


class RawLatents(torch.nn.Module):
    """TAESANA in the conventions of a core VAE's `first_stage_model`: raw DC-AE latents (B, 32, h, w) <-> images
    (B, 3, 32h, 32w) in [-1, 1] (TAESANA itself works on the DiT's scaled latents)."""

    def __init__(self, taesana: torch.nn.Module, scale: float):
        super().__init__()
        self.taesana, self.scale = taesana, scale

    def decode(self, z: torch.Tensor, **options: object) -> torch.Tensor:
        return self.taesana.decode(z * self.scale)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.taesana.encode(x) / self.scale


def vae_approx(prefix: str) -> list[str]:
    """vae_approx files, those whose name starts with `prefix` first."""
    import folder_paths

    files = folder_paths.get_filename_list("vae_approx")
    return sorted(files, key=lambda f: (not f.startswith(prefix), f))


def draft_vae(decoder: str, encoder: str | None):
    """A `comfy.sd.VAE` over TAESANA from its decoder (and optionally encoder) file, on ComfyUI's VAE device.

    Core's constructor detects models from a state dict, so it is not called; every attribute it sets (as of core
    0.38, see SanaVAE) is set here, and decode/encode/decode_tiled/encode_tiled are core's own, unchanged."""
    import comfy.model_management as mm
    import comfy.ops
    import comfy.sd

    from ..sana_core.taesana import FACTOR, LATENT_CHANNELS, load_taesana

    from .common import eager_ops, model_patcher
    from .model import SanaLatentFormat

    vae = comfy.sd.VAE.__new__(comfy.sd.VAE)
    vae.working_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    vae.device = mm.vae_device()
    vae.vae_dtype = mm.vae_dtype(vae.device, vae.working_dtypes)
    taesana = load_taesana(encoder, decoder, dtype=vae.vae_dtype, ops=eager_ops(comfy.ops.disable_weight_init))
    vae.first_stage_model = RawLatents(taesana, SanaLatentFormat.scale_factor).eval()
    # peak activations: about 6 maps of 64 channels at full size (decode), 24 values per pixel (encode)
    vae.memory_used_decode = lambda shape, dtype: 6 * 64 * shape[2] * shape[3] * FACTOR**2 * mm.dtype_size(dtype)
    vae.memory_used_encode = lambda shape, dtype: 24 * shape[2] * shape[3] * mm.dtype_size(dtype)
    vae.downscale_ratio = vae.upscale_ratio = FACTOR
    vae.latent_channels, vae.latent_dim = LATENT_CHANNELS, 2
    vae.output_channels = 3
    vae.pad_channel_value = vae.size = vae.format_encoded = None
    vae.handles_tiling, vae.audio_sample_rate = False, 44100  # core's own tiling; newer cores read both
    vae.process_input = lambda image: image * 2.0 - 1.0
    vae.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
    vae.disable_offload, vae.not_video, vae.crop_input = False, True, True
    vae.downscale_index_formula = vae.upscale_index_formula = vae.extra_1d_channel = None
    vae.output_device = mm.intermediate_device()
    vae.patcher = model_patcher(vae.first_stage_model, vae.device, mm.vae_offload_device())
    return vae


class SanaDraftVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaDraftVAELoader", display_name="Load TAESANA (draft Sana VAE)", category=CATEGORY,
            description="Loads TAESANA, the tiny autoencoder for Sana's DC-AE (taesana_decoder.pth and "
                        "taesana_encoder.pth from github.com/madebyollin/taesd, in models/vae_approx), as a core "
                        "VAE for VAEDecode / VAEEncode. It is approximate: fine detail and text differ from the "
                        "DC-AE's; use it for quick looks at drafts and large batches, and the DC-AE for final "
                        "images. Live previews use the same decoder file on their own.",
            inputs=[io.Combo.Input("decoder", options=vae_approx("taesana_decoder"),
                                   tooltip="taesana_decoder.pth / .safetensors in models/vae_approx"),
                    io.Combo.Input("encoder", options=[NONE, *vae_approx("taesana_encoder")], default=NONE,
                                   tooltip="taesana_encoder.pth for VAEEncode; none: the VAE only decodes")],
            outputs=[io.Vae.Output(tooltip="TAESANA as a core VAE: fast, approximate decode/encode")])

    @classmethod
    def execute(cls, decoder: str, encoder: str = NONE) -> io.NodeOutput:
        from .common import full_path

        return io.NodeOutput(draft_vae(full_path(decoder, "vae_approx"),
                                       None if encoder == NONE else full_path(encoder, "vae_approx")))
