"""Shared pieces of the node layer: socket types, model choices, dtype options, memory placement."""
from __future__ import annotations

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io

from .files import model_folders, resolve

GEMMA = io.Custom("SANA_GEMMA")  # a ModelPatcher over sana_core's SanaTextEncoder
DCAE = io.Custom("SANA_DCAE")    # a ModelPatcher over sana_core's DCAE
CATEGORY = "Sana"
DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def choices(*folders: str) -> list[str]:
    """Weight files and model folders of ComfyUI model folder types (e.g. "diffusion_models", "checkpoints")."""
    files = [f for name in folders for f in folder_paths.get_filename_list(name)]
    dirs = model_folders([p for name in folders for p in folder_paths.get_folder_paths(name)])
    return sorted(set(files)) + dirs


def full_path(name: str, *folders: str) -> str:
    return resolve([p for f in folders for p in folder_paths.get_folder_paths(f)], name)


def pick_dtype(choice: str) -> torch.dtype:
    """A dtype option; "default" is bf16 where the GPU supports it, else fp32."""
    return DTYPES[choice] or (torch.bfloat16 if mm.should_use_bf16(mm.get_torch_device()) else torch.float32)


class Holder(torch.nn.Module):
    """The module a ModelPatcher manages (it sets bookkeeping attributes such as `device` on it)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner


def patcher(module: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    """Hand a module to ComfyUI's memory manager: loaded on the GPU when used, offloaded when idle."""
    return comfy.model_patcher.ModelPatcher(Holder(module), load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def on_device(model: comfy.model_patcher.ModelPatcher, memory_required: int = 0) -> torch.nn.Module:
    """Load a patcher's module onto its device (evicting idle models if needed, also to leave
    `memory_required` bytes free for the work to come) and return the module."""
    mm.load_models_gpu([model], memory_required=memory_required, force_full_load=True)
    return model.model.inner
