"""Writing the trainer's files: a fully fine-tuned DiT in NVlabs' layout, complete enough for NVlabs' and
diffusers' loaders, and safetensors files with the usual file mode."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoints.dit import pointwise_kernels
from ..dit import DiTConfig, sincos_pos_embed


def nvlabs_state_dict(sd: dict[str, torch.Tensor], cfg: DiTConfig, null_embedding: torch.Tensor,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our DiT state dict (2-D Mix-FFN kernels) -> an NVlabs checkpoint's: (out, in, 1, 1) kernels, plus the two
    tensors NVlabs' `SanaMS` stores and diffusers' single-file converter expects: `pos_embed` (1, N, C), the
    sin-cos table of the base grid, and `y_embedder.y_embedding` (T, 2304), the null caption used by caption
    dropout and CFG. Cast to `dtype` (None keeps each tensor's)."""
    out = pointwise_kernels({k: v.detach().to(dtype or v.dtype).contiguous() for k, v in sd.items()}, 4)
    base = cfg.base_size
    out["pos_embed"] = sincos_pos_embed(cfg.width, base, base, base, cfg.pe_interpolation)[None].to(
        out["final_layer.scale_shift_table"].dtype)
    out["y_embedder.y_embedding"] = null_embedding.detach().to(out["pos_embed"].dtype).contiguous()
    return out


def normal_mode(path: str | Path) -> None:
    """Give a file the mode a plain `open()` would (0644 under the usual umask): safetensors writes 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
                      ) -> Path:
    """`safetensors.torch.save_file` with the usual file mode (`normal_mode`)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    normal_mode(path)
    return Path(path)


def save_full(sd: dict[str, torch.Tensor], cfg: DiTConfig, null_embedding: torch.Tensor, stem: str | Path,
              dtype: torch.dtype | None = None) -> list[Path]:
    """Write `<stem>.safetensors` and `<stem>.pth` ({"state_dict": ...}, as NVlabs' releases) from our DiT state
    dict `sd`; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = nvlabs_state_dict(sd, cfg, null_embedding, dtype)
    paths = [stem.with_suffix(".safetensors"), stem.with_suffix(".pth")]
    write_safetensors(out, paths[0], metadata={"format": "pt"})
    torch.save({"state_dict": out}, paths[1])
    return paths
