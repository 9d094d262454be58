"""Sana ControlNets as core CONTROL_NET objects: core Apply ControlNet (Advanced) sets the hint, strength and
start/end percent and chains several; SanaSampler, KSampler and SamplerCustomAdvanced run them.

The hint image is resized (bicubic) and centre-cropped to the latent's pixel size and encoded by the DC-AE (the
VAE given to Apply ControlNet, else the one given to the loader), once per size. Each step, `get_control` hands
the DiT the ControlNets in their step range (`SanaControls`); the DiT runs their branches inside its forward,
each in the order its file was trained in. The branch's weights sit behind their own ModelPatcher, so ComfyUI's
memory manager loads and offloads them with the model.
"""
from __future__ import annotations

import logging

import comfy.controlnet
import comfy.model_management as mm
import torch

from ..sana_core.checkpoints.controlnet import load_controlnet
from ..sana_core.controlnet import Control, SanaControlNet
from ..sana_core.dit import SanaDiT
from ..sana_core.resolutions import resize_and_crop

from .common import patchable
from .model import SanaControls, SanaLatentFormat, weight_ops

log = logging.getLogger(__name__)


class ComfySanaControlNet(SanaControlNet):
    """`SanaControlNet` computing in the dtype the DiT computes in (set by the DiT each call), whatever its
    weights are stored in; comfy.ops casts them layer by layer."""

    compute: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.compute or super().compute_dtype


class SanaControlNetPatch(comfy.controlnet.ControlNet):
    """A Sana ControlNet for core's apply nodes (a `comfy.controlnet.ControlNet`: copy, chaining, timestep
    range, get_models). `vae`: the DC-AE to encode hints with when the apply node is given none."""

    def __init__(self, net: ComfySanaControlNet | None = None, load_device: torch.device | None = None,
                 manual_cast_dtype: torch.dtype | None = None, vae: object = None):
        super().__init__(net, compression_ratio=1, latent_format=SanaLatentFormat(), load_device=load_device,
                         manual_cast_dtype=manual_cast_dtype, extra_conds=[])
        self.own_vae = vae

    def copy(self) -> "SanaControlNetPatch":
        c = SanaControlNetPatch(None, self.load_device, self.manual_cast_dtype, self.own_vae)
        c.control_model, c.control_model_wrapped = self.control_model, self.control_model_wrapped
        self.copy_to(c)
        return c

    def set_cond_hint(self, cond_hint, strength=1.0, timestep_percent_range=(0.0, 1.0), vae=None, extra_concat=[]):
        vae = vae or self.own_vae
        if vae is None:
            raise ValueError("Sana ControlNet: the control image is encoded by Sana's DC-AE; connect a Sana VAE to the "
                             "vae input of Apply ControlNet (or to SanaControlNetLoader's vae input)")
        if getattr(vae, "latent_channels", None) != 32 or vae.spacial_compression_encode() != 32:
            raise ValueError("Sana ControlNet: the VAE given is not Sana's DC-AE (32 latent channels, 32x); load it "
                             "with SanaDCAELoader")
        return super().set_cond_hint(cond_hint, strength, timestep_percent_range, vae, extra_concat)

    def pre_run(self, model, percent_to_timestep_function) -> None:
        dit = getattr(model, "diffusion_model", None)
        if not isinstance(dit, SanaDiT):
            raise ValueError("a Sana ControlNet can only drive a Sana model (load the model with a Sana loader)")
        self.control_model.check_base(dit.cfg)  # before sampling starts
        super().pre_run(model, percent_to_timestep_function)

    def _hint(self, x_noisy: torch.Tensor, batched_number: int) -> torch.Tensor:
        """The DC-AE latent (scaled) of the hint image at x_noisy's size, broadcast to its batch."""
        h, w = x_noisy.shape[-2:]
        if self.cond_hint is None or self.cond_hint.shape[-2:] != (h, w):
            image = resize_and_crop(self.cond_hint_original.float(), h * 32, w * 32, mode="bicubic").clamp(0, 1)
            loaded = mm.loaded_models(only_currently_used=True)
            latent = self.vae.encode(image.movedim(1, -1))
            mm.load_models_gpu(loaded)
            self.cond_hint = self.latent_format.process_in(latent.float()).to(x_noisy.device)
        hint = self.cond_hint
        if hint.shape[0] not in (1, x_noisy.shape[0]):
            hint = comfy.controlnet.broadcast_image_to(hint, x_noisy.shape[0], batched_number)
        return hint

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options) -> SanaControls | None:
        prev = None
        if self.previous_controlnet is not None:
            prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
            if prev is not None and not isinstance(prev, SanaControls):
                raise ValueError("Sana: a non-Sana ControlNet is chained with a Sana ControlNet; only Sana "
                                 "ControlNets (SanaControlNetLoader) can drive a Sana model")
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return prev
        mm.throw_exception_if_processing_interrupted()
        return SanaControls([*(prev or []), Control(self.control_model, self._hint(x_noisy, batched_number),
                                                    float(self.strength))])


def load_sana_controlnet(path: str, weight_dtype: str = "default", vae: object = None) -> SanaControlNetPatch:
    """A Sana ControlNet file or folder (NVlabs' combined `.pth`: only its branch is read) -> CONTROL_NET,
    stored in `weight_dtype` (a `model.WEIGHT_DTYPES` name) and computing as the DiT it drives."""
    load_device = mm.get_torch_device()
    dtype, compute, ops = weight_ops(weight_dtype, load_device)
    net = patchable(load_controlnet(path, dtype=dtype, ops=ops, device=mm.unet_offload_device(),
                                    model_class=ComfySanaControlNet))
    log.info("Sana: ControlNet %s (%s order, %d blocks, width %d)", path, net.order, len(net.controlnet),
             net.cfg.width)
    return SanaControlNetPatch(net, load_device=load_device, manual_cast_dtype=compute, vae=vae)
