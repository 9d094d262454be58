"""Reading weight files: safetensors (single or sharded), NVlabs `.pth`, diffusers folders.

Everything here returns plain ``{key: tensor}`` dicts on the CPU. Nothing is unpickled beyond tensors
(``torch.load(weights_only=True)``), and a broken file raises :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

import torch

from .common import CheckpointError, Keep, PathLike
from .gguf_files import read_gguf, tensor_names

log = logging.getLogger(__name__)


#: Key fragments of the models that end up in the wrong loader, first match wins (for error messages).
KNOWN_MODELS = (
    ("lora", "a LoRA"),
    ("input_hint_block.", "a Stable Diffusion ControlNet"),
    ("controlnet_cond_embedding.", "a diffusers SD / SDXL ControlNet"),
    ("controlnet_x_embedder.", "a Flux / SD3 ControlNet"),
    ("controlnet.0.before_proj.", "a Sana ControlNet (NVlabs)"),
    ("input_block.", "a diffusers Sana ControlNet"),
    ("input_blocks.", "a Stable Diffusion / SDXL UNet"),
    ("double_blocks.", "a Flux transformer"),
    ("joint_blocks.", "an SD3 transformer"),
    ("x_embedder.", "a diffusion transformer (DiT: Sana / PixArt)"),
    ("transformer_blocks.", "a diffusers transformer (e.g. a Sana DiT)"),
    ("decoder.mid.block_1.", "a Stable Diffusion / SDXL / Flux VAE (original layout)"),
    ("decoder.mid_block.", "a diffusers AutoencoderKL VAE (SD / SDXL / Flux)"),
    ("encoder.stages.", "a DC-AE autoencoder"),
    ("decoder.up_blocks.", "a diffusers autoencoder"),
    ("encoder.block.", "a T5 encoder"),
    ("self_attn.q_norm.", "an LLM with q/k-norm (Gemma-3, Qwen-3)"),
    ("layers.0.self_attn.", "a language model (e.g. Gemma)"),
    ("encoder.", "an encoder without decoder weights"),
)


def describe_keys(sd: dict[str, "torch.Tensor"]) -> str:
    """What a state dict looks like, for errors: "it looks like a LoRA (12 tensors, e.g. [...])"."""
    keys = list(sd)
    what = next((name for frag, name in KNOWN_MODELS if any(frag in k.lower() for k in keys)), None)
    found = f"{len(keys)} tensors, e.g. {keys[:3]}"
    return f"it looks like {what} ({found})" if what else f"found {found}"


def _load_safetensors(path: Path, dtype: torch.dtype | None, keep: Keep) -> dict[str, torch.Tensor]:
    """Tensor by tensor from the memory-mapped file, each cast as it is read: one copy in memory at most."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: _cast(f.get_tensor(k), dtype) for k in f.keys() if keep is None or keep(k)}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: cannot read this .safetensors file ({e}); it may be truncated or corrupt, download it again"
        ) from e


def _load_pickle(path: Path, dtype: torch.dtype | None, keep: Keep) -> dict[str, torch.Tensor]:
    """The tensors stay memory-mapped until kept and cast: the ones not kept are never read."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(
            f"{path}: cannot read this checkpoint with torch.load(weights_only=True) ({type(e).__name__}: {e}); "
            "it may be truncated, corrupt, or hold arbitrary Python objects (which are never unpickled)"
        ) from e
    # NVlabs saves {"state_dict": {...}} (and sometimes "ema"); Lightning/others use "model"/"module".
    for wrapper in ("state_dict", "ema", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (optionally under 'state_dict'), found {type(obj).__name__}")
    return cast_state_dict({k: v for k, v in obj.items() if keep is None or keep(k)}, dtype)


def _load_sharded(index_path: Path, dtype: torch.dtype | None, keep: Keep) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index (expected JSON with 'weight_map'): {e}") from e
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{index_path}: shard '{shard}' listed in the index is missing ({shard_path})")
        sd.update(read_state_dict(shard_path, dtype, keep))
    missing = {k for k in weight_map if keep is None or keep(k)} - set(sd)
    if missing:
        raise CheckpointError(f"{index_path}: {len(missing)} keys listed in the index are absent from the shards, e.g. {sorted(missing)[:3]}")
    return sd


def find_weights_file(folder: PathLike, stems: Iterable[str], variant: str | None = None) -> Path:
    """The weight file in a diffusers/HF folder: ``<stem>[.<variant>].safetensors`` or its shard index.

    ``stems`` are tried in order (e.g. ``("diffusion_pytorch_model", "model")``). Without ``variant`` the
    plain file is preferred, then any variant (``fp16``/``bf16``) present.
    """
    folder = Path(folder)
    variants = [variant] if variant else [None, "bf16", "fp16", "fp32"]
    for stem in stems:
        for v in variants:
            name = f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors"
            for candidate in (folder / name, folder / f"{name}.index.json"):
                if candidate.is_file():
                    return candidate
    wanted = ", ".join(f"{s}{'.' + variant if variant else ''}.safetensors" for s in stems)
    raise FileNotFoundError(f"{folder}: no weight file found (expected {wanted} or a sharded .index.json)")


def locate(path: Path, component: str, variant: str | None = None) -> tuple[Path, dict | None]:
    """A weight file as it is, or in a diffusers folder (its root or its `component/` subfolder) the weight file
    and the `config.json` next to it (None when absent)."""
    if path.is_file():
        return path, None
    if (path / component).is_dir():
        path = path / component
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    config = read_json(path / "config.json") if (path / "config.json").is_file() else None
    return find_weights_file(path, ("diffusion_pytorch_model", "model"), variant), config


def read_state_dict(path: PathLike, dtype: torch.dtype | None = None, keep: Keep = None) -> dict[str, torch.Tensor]:
    """Read the tensors of a weight file (``.safetensors``, ``*.index.json``, ``.pth``/``.pt``/``.ckpt``/``.bin``,
    ``.gguf``, whose quantized tensors stay quantized):
    all, or those whose raw key ``keep(key)`` accepts (the others are never read into memory).

    Floating-point tensors are cast to ``dtype`` as they are read (None keeps the file's; fp8 becomes bf16),
    so a file is never held twice. Returns the raw keys; see :func:`strip_prefixes` for wrapper prefixes.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; expected a weight file")
    name = path.name.lower()
    if name.endswith(".index.json"):
        return _load_sharded(path, dtype, keep)
    if name.endswith(".safetensors") or name.endswith(".sft"):
        return _load_safetensors(path, dtype, keep)
    if name.endswith((".pth", ".pt", ".ckpt", ".bin")):
        return _load_pickle(path, dtype, keep)
    if name.endswith(".gguf"):  # quantized tensors stay quantized (sana_core.quantized)
        return read_gguf(path, dtype, keep)
    raise CheckpointError(f"{path}: unknown weight file type; expected .safetensors, .pth, .pt, .ckpt, .bin, .gguf "
                          "or a shard .index.json")


def read_keys(path: PathLike) -> list[str]:
    """The raw keys of a weight file, without reading its tensors (pickles are memory-mapped)."""
    path = Path(path)
    if path.name.lower().endswith(".index.json"):
        return list(read_json(path).get("weight_map", {}))
    if path.name.lower().endswith((".safetensors", ".sft")):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return list(f.keys())
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read this .safetensors file ({e})") from e
    if path.name.lower().endswith(".gguf"):
        return tensor_names(path)
    return list(read_state_dict(path))


def strip_prefixes(sd: dict[str, torch.Tensor], anchors: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove a wrapper prefix (``model.diffusion_model.``, ``model.``, ``vae.``...) from every key.

    ``anchors`` are full keys that the bare model always has, e.g. ``"x_embedder.proj.weight"``. The prefix
    is whatever stands before the first anchor found; keys without that prefix are dropped (they belong to
    other models bundled in the same file, like a VAE inside a full checkpoint).
    """
    for anchor in anchors:
        for key in sd:
            if key == anchor:
                return sd
            if key.endswith("." + anchor):
                prefix = key[: len(key) - len(anchor)]
                log.debug("stripping key prefix %r", prefix)
                return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def read_json(path: PathLike) -> dict:
    """A JSON config file, with an error that names the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    if dtype is None:
        dtype = torch.bfloat16 if t.dtype.itemsize == 1 else t.dtype  # fp8 storage computes in bf16
    return t.to(dtype)


def cast_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating-point tensors to ``dtype`` (None: fp8 to bf16, others kept) one at a time, freeing each
    original; integer tensors are kept. The input dict is emptied so that only one copy is alive at a time."""
    return {key: _cast(sd.pop(key), dtype) for key in list(sd)}


def load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: PathLike | str) -> None:
    """``load_state_dict(strict=True, assign=True)`` into a module built on ``meta``, with a readable error.

    Checks names and shapes first, so a mismatch raises :class:`CheckpointError` naming ``source``, the
    missing and unexpected keys and the first shape differences, and nothing is half-loaded.
    """
    expected = module.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:4]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise CheckpointError(f"{source}: weights do not fit the detected model: " + "; ".join(parts))
    module.load_state_dict(sd, strict=True, assign=True)
