"""Shared pieces of the node layer: model choices, dtype options, model patchers and ops, validation."""
from __future__ import annotations

import math
from collections.abc import Callable

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io

from ..sana_core import precision
from .files import model_folders, resolve

CATEGORY = "Sana"
DTYPES = {"default": None, **precision.DTYPES}  # the dtype options of the loaders
#: Subfolders of a diffusers pipeline folder that hold another component (not offered to a loader of this one).
COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer", "scheduler")


def choices(*folders: str, component: str | None = None) -> list[str]:
    """Weight files and model folders of ComfyUI model folder types (e.g. "diffusion_models", "checkpoints").
    With `component` (e.g. "vae"), pipeline subfolders holding another component are left out."""
    files = [f for name in folders for f in folder_paths.get_filename_list(name)]
    dirs = model_folders([p for name in folders for p in folder_paths.get_folder_paths(name)])
    if component is not None:
        other = {c for c in COMPONENTS if c != component}
        dirs = [d for d in dirs if d.rstrip("/").rsplit("/", 1)[-1] not in other]
    return sorted(set(files)) + dirs


def full_path(name: str, *folders: str) -> str:
    return resolve([p for f in folders for p in folder_paths.get_folder_paths(f)], name)


def pick_dtype(choice: str, device: torch.device, allowed: tuple[torch.dtype, ...] = tuple(DTYPES.values())[1:]
               ) -> torch.dtype:
    """A dtype option for a model running on `device`; "default" is bf16 where supported, else fp32."""
    dtype = DTYPES[choice] or (torch.bfloat16 if mm.should_use_bf16(device) else torch.float32)
    return dtype if dtype in allowed else torch.float32


def core_patcher() -> type:
    """The patcher class core builds its own models with: `CoreModelPatcher` where the core has one (newer cores
    make it Dynamic VRAM's patcher, streaming comfy.ops layers), else `ModelPatcher`."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def model_patcher(model: torch.nn.Module, load_device: torch.device,
                  offload_device: torch.device) -> comfy.model_patcher.ModelPatcher:
    """Hand a model to ComfyUI's memory manager (loaded when used, offloaded when idle) as core does."""
    return core_patcher()(model, load_device=load_device, offload_device=offload_device)


def eager_ops(ops: type) -> type:
    """`ops` (a comfy.ops class) whose Linear/Conv2d create their weights when built. Newer cores (Dynamic VRAM)
    leave a comfy.ops weight out until a state dict is loaded into it, unless the layer brings its own loader;
    our models are built on `meta` and checked key by key before loading (`checkpoints.load_strict`)."""

    def own_loader(base: type) -> type:
        def _load_from_state_dict(self, *args):  # noqa: ANN001, ANN202 (torch's signature)
            return base._load_from_state_dict(self, *args)

        return type(base.__name__, (base,), {"_load_from_state_dict": _load_from_state_dict})

    return type(f"Eager_{ops.__name__}", (ops,), {"Linear": own_loader(ops.Linear), "Conv2d": own_loader(ops.Conv2d)})


class Leaf(torch.nn.Module):
    """Holds one parameter (`value`) that sat directly on a module with children."""

    def __init__(self, value: torch.nn.Parameter):
        super().__init__()
        self.value = value


def patchable(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter that sits directly on a module with children (the DiT blocks' and final layer's
    `scale_shift_table`) into a `Leaf` child named `<name>_leaf`, read back through a property of the same
    name. ComfyUI's patcher loads and patches leaf modules only, so model merges, LoRAs and weight patches
    would otherwise silently miss those parameters. Their ComfyUI keys become `...<name>_leaf.value`."""
    swapped: dict[type, type] = {}
    for module in list(model.modules()):
        direct = list(module._parameters)
        if not direct or not list(module.children()):
            continue
        for name in direct:
            module.add_module(f"{name}_leaf", Leaf(module._parameters.pop(name)))
        base = type(module)
        if base not in swapped:
            props = {name: property(lambda self, n=f"{name}_leaf": self._modules[n].value) for name in direct}
            swapped[base] = type(base.__name__, (base,), props)
        module.__class__ = swapped[base]
    return model


def check_widgets(node: type[io.ComfyNode], values: dict) -> bool | str:
    """The checks core cannot make, for the widgets a node's `validate_inputs` names (core then skips its own
    min/max/option checks for those, and checks the others itself): NaN/inf refused (core lets NaN through
    min/max), then min/max from the schema. Values core could not convert (it reports them) and links (None)
    are skipped. Returns True or an error naming the field."""
    specs = {spec.id: spec for spec in node.define_schema().inputs}
    for name, value in values.items():
        spec = specs.get(name)
        if spec is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name}: {value} is not a finite number"
        low, high = getattr(spec, "min", None), getattr(spec, "max", None)
        if low is not None and value < low:
            return f"{name}: {value} is below the minimum {low}"
        if high is not None and value > high:
            return f"{name}: {value} is above the maximum {high}"
    return True


def wrap_once(owner: object, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """Replace core's `owner.<name>` (a module function or a node class's method) by `wrap(core's)`, once: an
    attribute that is already our wrapper (the pack installed twice) is left as it is. How the pack patches
    core where core has no hook (LoRA key map, previewer, latent sizes, conditioning combines)."""
    core = getattr(owner, name)
    if getattr(core, "sana", False):
        return
    wrapper = wrap(core)
    wrapper.sana = True
    setattr(owner, name, wrapper)
