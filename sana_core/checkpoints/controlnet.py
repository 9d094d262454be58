"""Sana ControlNet checkpoints: NVlabs branches (alone, or inside a combined base + ControlNet `.pth`, the
released form) and diffusers `SanaControlNetModel` folders or files; detected by keys, built on meta, loaded
strictly. Only the branch is read from a combined file, so the base weights are never held twice."""
from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..controlnet import SanaControlNet
from ..dit import DiTConfig
from .dit import (CONTROL_BRANCH, CROSS_HEADS, _depth, diffusers_to_nvlabs, pointwise_kernels,
                  with_diffusers_config)
from .files import (CheckpointError, PathLike, describe_keys, load_strict, locate, read_keys, read_state_dict,
                    strip_prefixes)

log = logging.getLogger(__name__)

NVLABS_ANCHOR, DIFFUSERS_ANCHOR = "controlnet.0.before_proj.weight", "input_block.weight"


def diffusers_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`SanaControlNetModel` keys -> ours: `input_block` -> `controlnet.0.before_proj`, `controlnet_blocks.N` ->
    `controlnet.N.after_proj`, `transformer_blocks.N` -> `controlnet.N.copied_block`, embedders as the DiT's."""
    out = {k.replace("input_block.", "controlnet.0.before_proj.", 1): sd.pop(k) for k in list(sd)
           if k.startswith("input_block.")}
    for k in [k for k in sd if k.startswith("controlnet_blocks.")]:
        n, rest = k[len("controlnet_blocks."):].split(".", 1)
        out[f"controlnet.{n}.after_proj.{rest}"] = sd.pop(k)
    for k, v in diffusers_to_nvlabs(sd, final=False).items():
        out[re.sub(r"^blocks\.(\d+)\.", r"controlnet.\1.copied_block.", k)] = v
    return out


def _branch_config(sd: dict[str, torch.Tensor], base: DiTConfig | None, source: PathLike | str) -> DiTConfig:
    """The block config of an NVlabs branch, checked against the base DiT's when given."""
    width = sd[NVLABS_ANCHOR].shape[0]
    found = dict(width=width, mlp_ratio=sd["controlnet.0.copied_block.mlp.point_conv.conv.weight"].shape[1] / width,
                 qk_norm="controlnet.0.copied_block.attn.q_norm.weight" in sd)
    if base is None:
        return replace(DiTConfig(), cross_heads=CROSS_HEADS.get(width, max(1, width // 32)), **found)
    ours = dict(width=base.width, mlp_ratio=base.mlp_ratio, qk_norm=base.qk_norm)
    if found != ours:
        raise CheckpointError(f"{source}: this ControlNet was made for a Sana DiT with {found}, but the DiT it "
                              f"should drive has {ours}: use the ControlNet released for that model")
    return base


def _diffusers_config(config: dict | None, sd: dict[str, torch.Tensor]) -> DiTConfig:
    """A diffusers-order branch's own config: from its `config.json`, else from the weights."""
    width = sd["x_embedder.proj.weight"].shape[0]
    cfg = DiTConfig(depth=0, width=width, in_channels=sd["x_embedder.proj.weight"].shape[1],
                    patch_size=sd["x_embedder.proj.weight"].shape[2],
                    cross_heads=CROSS_HEADS.get(width, max(1, width // 32)),
                    caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1],
                    mlp_ratio=sd["controlnet.0.copied_block.mlp.point_conv.conv.weight"].shape[1] / width,
                    qk_norm="controlnet.0.copied_block.attn.q_norm.weight" in sd)
    return with_diffusers_config(cfg, config) if config else cfg


def load_controlnet(path: PathLike, base: DiTConfig | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", ops: Any = None, variant: str | None = None,
                    model_class: type[SanaControlNet] = SanaControlNet) -> SanaControlNet:
    """Load a Sana ControlNet: NVlabs' branch (`controlnet.N.*` keys; from a combined base + ControlNet `.pth`
    only the branch is read) or a diffusers `SanaControlNetModel` (folder, its `controlnet/` subfolder, or a
    single safetensors file). Each runs in the order it was trained in (`SanaControlNet.order`).

    base: the config of the DiT it will drive (its width, MLP and q/k norm must match: else CheckpointError);
    dtype: None keeps the file's; model_class: a SanaControlNet subclass to build (a host's adapter).
    Raises CheckpointError naming the file for anything that is not a Sana ControlNet, before any model exists.
    """
    path = Path(path)
    file, config = locate(path, "controlnet", variant)
    if any(CONTROL_BRANCH.match(k) for k in read_keys(file)):
        sd = strip_prefixes(read_state_dict(file, dtype, keep=CONTROL_BRANCH.match), (NVLABS_ANCHOR,))
        order = "nvlabs"
    else:
        sd = strip_prefixes(read_state_dict(file, dtype), (DIFFUSERS_ANCHOR,))
        order = "diffusers"
        if DIFFUSERS_ANCHOR not in sd:
            raise CheckpointError(f"{file}: not a Sana ControlNet: {describe_keys(sd)}; expected NVlabs' "
                                  f"'{NVLABS_ANCHOR}' or diffusers' '{DIFFUSERS_ANCHOR}'")
        try:
            sd = diffusers_to_ours(sd)
        except CheckpointError as e:
            raise CheckpointError(f"{file}: {e}") from e
    sd = pointwise_kernels(sd, 2)
    try:
        cfg = _branch_config(sd, base, file) if order == "nvlabs" else _diffusers_config(config, sd)
    except KeyError as e:
        raise CheckpointError(f"{file}: incomplete Sana ControlNet, key {e} is missing") from e
    if order == "diffusers" and base is not None and cfg.width != base.width:
        raise CheckpointError(f"{file}: this ControlNet has width {cfg.width}, the DiT it should drive {base.width}: "
                              "use the ControlNet made for that model")
    depth = _depth(sd, "controlnet.")
    dtype = sd[NVLABS_ANCHOR].dtype
    with torch.device("meta"):
        net = model_class(cfg, order, ops=ops, depth=depth, dtype=dtype)
    load_strict(net, sd, file)
    log.info("loaded a Sana ControlNet (%s order, %d blocks, width %d) from %s (%s)", order, depth, cfg.width,
             file, dtype)
    return net.to(device).eval().requires_grad_(False)
