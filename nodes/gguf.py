"""GGUF weights in ComfyUI: comfy.ops layers that dequantize quantized weights at each call, a ModelPatcher that
keeps LoRA patches of quantized weights and applies them at dequantization, and the `.gguf` files of model
folders (which ComfyUI does not list for its own loaders)."""
from __future__ import annotations

import os

import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
import folder_paths
import torch

from ..sana_core.quantized import QuantizedLoad, QuantizedTensor, dequantize


def gguf_choices(*folders: str) -> list[str]:
    """The `.gguf` files under ComfyUI's model folders of these types, relative with '/'."""
    found = set()
    for base in (p for name in folders for p in folder_paths.get_folder_paths(name)):
        if os.path.isdir(base):
            files, _ = folder_paths.recursive_search(base, excluded_dir_names=[".git"])
            found.update(f.replace(os.sep, "/") for f in folder_paths.filter_files_extensions(files, {".gguf"}))
    return sorted(found)


class _Layer(QuantizedLoad):
    """A comfy.ops layer whose quantized weight is dequantized (float32), patched (LoRA patches kept by
    `GGUFModelPatcher`, then ComfyUI's low-VRAM weight functions) and cast to the input's dtype at each call."""

    gguf_patches: tuple = ()      # (key, ComfyUI patch list) of this layer's weight, set by GGUFModelPatcher

    def quantized_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        non_blocking = mm.device_supports_non_blocking(x.device)
        w = dequantize(self.weight.to(x.device, non_blocking=non_blocking))
        for key, patches in self.gguf_patches:
            w = comfy.lora.calculate_weight(patches, w, key, intermediate_dtype=torch.float32)
        for f in self.weight_function:
            w = f(w)
        bias = None
        if self.bias is not None:
            bias = mm.cast_to(self.bias, x.dtype, x.device, non_blocking=non_blocking, copy=bool(self.bias_function))
            for f in self.bias_function:
                bias = f(bias)
        return w.to(x.dtype), bias


class GGUFComfyOps(comfy.ops.manual_cast):
    """comfy.ops for a DiT read from a GGUF: quantized layers dequantize, the others cast as manual_cast does."""

    quantized = True  # `sana_core.checkpoints.dit.load_dit` accepts quantized weights for these layers

    class Linear(_Layer, comfy.ops.manual_cast.Linear):
        def forward_comfy_cast_weights(self, x: torch.Tensor) -> torch.Tensor:
            if not isinstance(self.weight, QuantizedTensor):
                return super().forward_comfy_cast_weights(x)
            return torch.nn.functional.linear(x, *self.quantized_weights(x))

    class Conv2d(_Layer, comfy.ops.manual_cast.Conv2d):
        def forward_comfy_cast_weights(self, x: torch.Tensor) -> torch.Tensor:
            if not isinstance(self.weight, QuantizedTensor):
                return super().forward_comfy_cast_weights(x)
            return self._conv_forward(x, *self.quantized_weights(x))


class GGUFModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher whose LoRA patches of quantized weights are not merged (that would dequantize and store the
    weight in float) but handed to the layer, which adds them after each dequantization. Other weights are
    patched as ComfyUI does; `clone` keeps this class."""

    def patch_weight_to_device(self, key: str, device_to=None, inplace_update: bool = False) -> None:
        weight = comfy.utils.get_attr(self.model, key) if key in self.patches else None
        if not isinstance(weight, QuantizedTensor):
            return super().patch_weight_to_device(key, device_to, inplace_update)
        layer = comfy.utils.get_attr(self.model, key.rsplit(".", 1)[0])
        layer.gguf_patches = ((key, self.patches[key]),)
        if device_to is not None:
            comfy.utils.set_attr_param(self.model, key, weight.to(device_to))

    def unpatch_model(self, device_to=None, unpatch_weights: bool = True) -> None:
        if unpatch_weights:
            for m in self.model.modules():
                if isinstance(m, _Layer) and m.gguf_patches:
                    m.gguf_patches = ()
        return super().unpatch_model(device_to, unpatch_weights)
