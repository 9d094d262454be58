"""Model references: local paths, or Hugging Face repos fetched into the HF cache with only what a run needs.

A Sana diffusers repo holds every precision of every part (full-precision and fp16 files, sometimes bf16):
about 3x what a bf16 run reads. `resolve` fetches the parts asked for (transformer, vae, text_encoder with
its tokenizer, the scheduler's config) in one precision (`variant`, chosen from the dtype by default), falling back to the full-precision
files of a part that has no such variant. huggingface_hub shows its own progress bars and, offline
(`HF_HUB_OFFLINE=1`), answers from the cache.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger(__name__)

VARIANTS = ("fp16", "bf16")
SMALL_FILES = ("*.json", "*.txt", "*.model")  # configs, shard indexes, tokenizer files
CONFIG_ONLY = ("tokenizer", "scheduler")  # parts without weights
#: NVlabs repos released as one `.pth` (the ControlNets hold the base DiT and the branch): the file to fetch.
SINGLE_FILE_REPOS = {
    "Efficient-Large-Model/Sana_600M_1024px_ControlNet_HED": "checkpoints/Sana_600M_1024px_ControlNet_HED.pth",
    "Efficient-Large-Model/Sana_1600M_1024px_BF16_ControlNet_HED":
        "checkpoints/Sana_1600M_1024px_BF16_ControlNet_HED.pth",
}


def default_variant(dtype: torch.dtype) -> str | None:
    """The weight files a run in `dtype` reads: fp16 files for fp16, bf16 ones for bf16 (falling back to the
    full-precision files, never to fp16 ones: casting them to bf16 would lose precision twice), full otherwise."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)


def check_variant(variant: str | None) -> str | None:
    """A `variant` argument: None, "none" (the full-precision files) or one of VARIANTS."""
    if variant in (None, "none"):
        return None
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {', '.join(VARIANTS)} or 'none'")
    return variant


def repo_of(ref: str | Path) -> tuple[str, str] | None:
    """(repo id, file inside or "") of `owner/name[/file]` or `hf://owner/name[/file]`; None for other text."""
    text = str(ref)
    text = text[len("hf://"):] if text.startswith("hf://") else text
    parts = text.strip("/").split("/")
    if len(parts) < 2 or text.startswith((".", "/", "~")):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def patterns(folders: Sequence[str], variant: str | None) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns for the `folders` of a repo ("" = its root) in one precision."""
    allow = ["model_index.json"]
    for folder in folders:
        prefix = f"{folder}/" if folder else ""
        allow += [prefix + p for p in SMALL_FILES]
        if variant:
            allow += [f"{prefix}*.{variant}.safetensors", f"{prefix}*.{variant}-*.safetensors"]
        else:
            allow.append(f"{prefix}*.safetensors")
    ignore = [] if variant else [f"*.{v}{tail}" for v in VARIANTS for tail in (".safetensors", "-*.safetensors")]
    return allow, ignore


def fetch(repo: str, folders: Sequence[str], variant: str | None) -> Path:
    """Download `folders` of `repo` (with a text encoder, its tokenizer) in `variant`; a folder without such
    files is fetched in full precision instead."""
    from huggingface_hub import snapshot_download

    folders = list(folders) + (["tokenizer"] if "text_encoder" in folders else [])
    allow, ignore = patterns(folders, variant)
    log.info("fetching %s from Hugging Face: %s (%s weights)", repo, ", ".join(f or "/" for f in folders),
             variant or "full-precision")
    root = Path(snapshot_download(repo, allow_patterns=allow, ignore_patterns=ignore or None))
    weightless = [f for f in folders if f not in CONFIG_ONLY and not any((root / f).glob("*.safetensors"))]
    if variant and weightless:
        log.info("%s has no %s files in %s: fetching the full-precision ones", repo, variant, ", ".join(weightless))
        allow, ignore = patterns(weightless, None)
        root = Path(snapshot_download(repo, allow_patterns=allow, ignore_patterns=ignore))
    return root


def resolve(ref: str | Path, parts: Sequence[str] = ("",), variant: str | None = None) -> Path:
    """A local file or folder as it is; a repo id fetched with only `parts` (subfolders; "" = the whole repo as
    one component) in `variant`; `owner/name/file` fetches that one file, as does a repo of `SINGLE_FILE_REPOS`."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    repo = repo_of(ref)
    if repo is None:
        raise FileNotFoundError(f"{ref}: no such file or folder, and not a Hugging Face repo id (owner/name)")
    file = repo[1] or SINGLE_FILE_REPOS.get(repo[0])
    if file:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo[0], file))
    return fetch(repo[0], parts, variant)
