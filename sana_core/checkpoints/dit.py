"""Sana DiT checkpoints: detect the layout and variant from the keys, convert, build on meta, load strictly.

Layouts: NVlabs (`.pth` `{"state_dict": ...}` or flattened to safetensors; our model's own names) and diffusers
(`SanaTransformer2DModel`: split q/k/v, `transformer_blocks.N...`), either one possibly behind a wrapper prefix.
"""
from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..dit import VARIANTS, DiTConfig, SanaDiT
from ..quantized import GGUFOps, cat_rows, is_quantized
from .files import CheckpointError, PathLike, describe_keys, load_strict, locate, read_state_dict, strip_prefixes

log = logging.getLogger(__name__)

NVLABS_ANCHOR, DIFFUSERS_ANCHOR = "x_embedder.proj.weight", "patch_embed.proj.weight"
#: Keys of the ControlNet branch that NVlabs' released ControlNet files carry next to the base model.
CONTROL_BRANCH = re.compile(r"(?:.*\.)?controlnet\.\d+\.")
#: NVlabs keys used only in training (null caption, stored pos. embedding buffer, Sprint's log-variance head).
TRAINING_ONLY = ("y_embedder.y_embedding", "pos_embed", "logvar_linear.weight", "logvar_linear.bias")
#: Cross-attention heads of the released widths (their head dims are 72 and 112; not readable from weights).
CROSS_HEADS = {1152: 16, 2240: 20}

def _key_map(depth: int, qk_norm: bool, guidance: bool, final: bool = True) -> list[tuple[str, list[str]]]:
    """(NVlabs key, diffusers keys) pairs; several diffusers keys are concatenated on dim 0 (fused q/k/v).
    final: the output layer too (a diffusers ControlNet has the rest and no output layer)."""
    wb = ("weight", "bias")
    time = "time_embed.timestep_embedder" if guidance else "time_embed.emb.timestep_embedder"
    pairs = [(f"x_embedder.proj.{s}", [f"patch_embed.proj.{s}"]) for s in wb]
    pairs += [(f"t_embedder.mlp.{2 * i}.{s}", [f"{time}.linear_{i + 1}.{s}"]) for i in (0, 1) for s in wb]
    if guidance:
        pairs += [(f"cfg_embedder.mlp.{2 * i}.{s}", [f"time_embed.guidance_embedder.linear_{i + 1}.{s}"])
                  for i in (0, 1) for s in wb]
    pairs += [(f"t_block.1.{s}", [f"time_embed.linear.{s}"]) for s in wb]
    pairs += [(f"y_embedder.y_proj.fc{i}.{s}", [f"caption_projection.linear_{i}.{s}"]) for i in (1, 2) for s in wb]
    pairs += [("attention_y_norm.weight", ["caption_norm.weight"])]
    for n in range(depth):
        a, d = f"blocks.{n}.", f"transformer_blocks.{n}."
        pairs += [(a + "scale_shift_table", [d + "scale_shift_table"]),
                  (a + "attn.qkv.weight", [d + f"attn1.to_{x}.weight" for x in "qkv"]),
                  (a + "cross_attn.q_linear.weight", [d + "attn2.to_q.weight"]),
                  (a + "cross_attn.q_linear.bias", [d + "attn2.to_q.bias"]),
                  (a + "mlp.point_conv.conv.weight", [d + "ff.conv_point.weight"])]
        pairs += [(a + f"cross_attn.kv_linear.{s}", [d + f"attn2.to_{x}.{s}" for x in "kv"]) for s in wb]
        for ours, theirs in (("attn.proj", "attn1.to_out.0"), ("cross_attn.proj", "attn2.to_out.0"),
                             ("mlp.inverted_conv.conv", "ff.conv_inverted"), ("mlp.depth_conv.conv", "ff.conv_depth")):
            pairs += [(f"{a}{ours}.{s}", [f"{d}{theirs}.{s}"]) for s in wb]
        if qk_norm:
            pairs += [(f"{a}{att}.{x}_norm.weight", [f"{d}{datt}.norm_{x}.weight"])
                      for att, datt in (("attn", "attn1"), ("cross_attn", "attn2")) for x in "qk"]
    if final:
        pairs += [("final_layer.scale_shift_table", ["scale_shift_table"])]
        pairs += [(f"final_layer.linear.{s}", [f"proj_out.{s}"]) for s in wb]
    return pairs


_POINTWISE = (".mlp.inverted_conv.conv.weight", ".mlp.point_conv.conv.weight")


def pointwise_kernels(sd: dict[str, torch.Tensor], ndim: int) -> dict[str, torch.Tensor]:
    """The Mix-FFN's 1x1 conv kernels as our Linear weights (ndim 2) or as the checkpoints' (out, in, 1, 1) (4)."""
    for k in sd:
        if k.endswith(_POINTWISE) and sd[k].ndim != ndim:
            sd[k] = sd[k].reshape(sd[k].shape[:2] + (1, 1) * (ndim == 4))
    return sd


def _depth(sd: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not found or found != set(range(len(found))):
        raise CheckpointError(f"transformer blocks {sorted(found)[:8]}... are not numbered 0..N-1: truncated file?")
    return len(found)


def diffusers_to_nvlabs(sd: dict[str, torch.Tensor], final: bool = True) -> dict[str, torch.Tensor]:
    """diffusers `SanaTransformer2DModel` keys (final=False: the same parts of a `SanaControlNetModel`) -> our
    (NVlabs) keys. Consumes `sd` tensor by tensor."""
    depth = _depth(sd, "transformer_blocks.")
    qk_norm = "transformer_blocks.0.attn1.norm_q.weight" in sd
    guidance = "time_embed.guidance_embedder.linear_1.weight" in sd
    out = {}
    for ours, theirs in _key_map(depth, qk_norm, guidance, final):
        missing = [k for k in theirs if k not in sd]
        if missing:
            raise CheckpointError(f"diffusers Sana transformer is missing {missing[0]!r}: truncated or not a Sana DiT?")
        parts = [sd.pop(k) for k in theirs]
        out[ours] = parts[0] if len(parts) == 1 else cat_rows(parts)
    if sd:
        raise CheckpointError(f"unexpected keys in a diffusers Sana transformer: {sorted(sd)[:4]}")
    return out


def nvlabs_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (NVlabs) keys -> diffusers keys (fused q/k/v split on dim 0). Used to write diffusers files."""
    depth = _depth(sd, "blocks.")
    qk_norm, guidance = "blocks.0.attn.q_norm.weight" in sd, "cfg_embedder.mlp.0.weight" in sd
    sd = pointwise_kernels(dict(sd), 4)
    out = {}
    for ours, theirs in _key_map(depth, qk_norm, guidance):
        out.update(zip(theirs, sd[ours].chunk(len(theirs), dim=0)))
    return {k: v.contiguous() for k, v in out.items()}


def to_nvlabs(sd: dict[str, torch.Tensor], source: PathLike | str) -> dict[str, torch.Tensor]:
    """Any supported DiT state dict (prefixed or not, either layout) -> our keys and shapes, training-only
    keys dropped."""
    if not sd:
        raise CheckpointError(f"{source}: no Sana DiT weights in this file (a ControlNet branch alone is loaded by the "
                              "ControlNet loader, next to a base DiT)")
    sd = strip_prefixes(sd, (NVLABS_ANCHOR, DIFFUSERS_ANCHOR))
    if "input_block.weight" in sd and "controlnet_blocks.0.weight" in sd:
        raise CheckpointError(f"{source}: this is a diffusers Sana ControlNet, not a DiT; load it with the ControlNet "
                              "loader next to a base DiT")
    if NVLABS_ANCHOR in sd:
        for k in TRAINING_ONLY:
            sd.pop(k, None)
        return pointwise_kernels(sd, 2)
    if DIFFUSERS_ANCHOR in sd:
        return pointwise_kernels(diffusers_to_nvlabs(sd), 2)
    raise CheckpointError(f"{source}: not a Sana DiT checkpoint: {describe_keys(sd)}; expected keys such as "
                          f"'{NVLABS_ANCHOR}' (NVlabs) or '{DIFFUSERS_ANCHOR}' (diffusers)")


def _resolution_hint(name: str) -> int | None:
    """2048 / 4096 from names like `Sana_1600M_4Kpx_BF16` or `..._2048px...`, else None."""
    m = re.search(r"(?<![0-9])(2|4)K(?:px)?(?![a-z])|(2048|4096)px", name, re.IGNORECASE)
    if not m:
        return None
    return {"2": 2048, "4": 4096}[m.group(1)] if m.group(1) else int(m.group(2))


def with_diffusers_config(cfg: DiTConfig, dc: dict) -> DiTConfig:
    """`cfg` with what a diffusers `config.json` (transformer or ControlNet) says and the weights cannot: heads,
    the sin-cos positional embedding, the timestep and guidance scales."""
    interp = dc.get("interpolation_scale")
    return replace(cfg, cross_heads=dc.get("num_cross_attention_heads") or cfg.cross_heads,
                   self_head_dim=dc.get("attention_head_dim", cfg.self_head_dim),
                   use_pe=interp is not None, pe_interpolation=float(interp or 1.0),
                   base_size=dc.get("sample_size", cfg.base_size), timestep_scale=dc.get("timestep_scale", 1.0),
                   guidance_embeds_scale=dc.get("guidance_embeds_scale", cfg.guidance_embeds_scale))


def detect_config(sd: dict[str, torch.Tensor], name: str = "", diffusers_config: dict | None = None,
                  use_pe: bool | None = None) -> tuple[str, DiTConfig]:
    """The variant name and config of a DiT state dict in our keys.

    Shapes give depth, width, channels, MLP ratio; key presence gives q/k norm and the guidance embedder.
    What the weights cannot tell (cross-attention heads, the 2K/4K sin-cos positional embedding) comes from
    `diffusers_config` (a transformer `config.json`), else from the released widths and the checkpoint
    `name` (e.g. `Sana_1600M_4Kpx_BF16`), and `use_pe` overrides the positional-embedding choice.
    """
    proj = sd[NVLABS_ANCHOR]                                   # (C, 32, p, p)
    width, in_ch, p = proj.shape[0], proj.shape[1], proj.shape[2]
    cfg = DiTConfig(
        depth=_depth(sd, "blocks."), width=width, in_channels=in_ch, patch_size=p,
        cross_heads=CROSS_HEADS.get(width, max(1, width // 32)),
        caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1],
        mlp_ratio=sd["blocks.0.mlp.point_conv.conv.weight"].shape[1] / width,
        qk_norm="blocks.0.attn.q_norm.weight" in sd, guidance_embed="cfg_embedder.mlp.0.weight" in sd)
    if diffusers_config:
        cfg = with_diffusers_config(cfg, diffusers_config)
    else:
        res = _resolution_hint(name)
        if res:
            cfg = replace(cfg, use_pe=True, pe_interpolation=res / 2048, base_size=res // 32)
        elif use_pe is None and cfg == VARIANTS["sana-1.6b"]:  # the 2K/4K releases share this architecture
            log.warning("%s: no config and no 2K/4K in the name, so loaded as the 1024 px Sana 1.6B without the "
                        "2K/4K positional embedding; if it is a 2K or 4K model, turn use_pe on (or keep 2K/4K "
                        "in the file name)", name)
    if use_pe is not None and use_pe != cfg.use_pe:
        cfg = replace(cfg, use_pe=use_pe)
    variant = next((n for n, v in VARIANTS.items() if v == cfg), f"custom ({cfg.depth} blocks, width {cfg.width})")
    return variant, cfg


def load_dit(path: PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             ops: Any = None, use_pe: bool | None = None, variant: str | None = None,
             model_class: type[SanaDiT] = SanaDiT) -> SanaDiT:
    """Load a Sana DiT from an NVlabs `.pth`, a single safetensors file (either layout, any wrapper prefix)
    or a diffusers folder (root or `transformer/`, sharded and `variant` files included). The ControlNet branch
    of NVlabs' combined ControlNet files (`controlnet.N.*`) is not read (`checkpoints.controlnet` loads it).

    dtype: None keeps the file's dtype (fp8 storage becomes bf16); use_pe overrides the 2K/4K positional
    embedding decision; model_class: a SanaDiT subclass to build (a host's adapter). The variant found is in
    `model.variant`. Raises CheckpointError on anything that is
    not a complete Sana DiT, before any model exists.

    A `.gguf` (either layout's names; our quantize command also stores the diffusers config) keeps its quantized
    matrices quantized: the model is built with `quantized.GGUFOps` (ops=None) or the host's quantization-aware
    `ops` (`ops.quantized` true), and `dtype` is then the dtype of the unquantized tensors and of the compute.
    """
    path = Path(path)
    file, config = locate(path, "transformer", variant)
    if config is None and file.suffix.lower() == ".gguf":
        from .gguf_files import sana_config

        config = sana_config(file)
    sd = to_nvlabs(read_state_dict(file, dtype, keep=lambda k: not CONTROL_BRANCH.match(k)), file)
    name = "/".join(path.resolve().parts[-3:])
    try:
        detected, cfg = detect_config(sd, name, config, use_pe)
    except KeyError as e:
        raise CheckpointError(f"{file}: incomplete Sana DiT checkpoint, key {e} is missing") from e
    dtype = sd[NVLABS_ANCHOR].dtype
    if any(is_quantized(t) for t in sd.values()):
        if ops is None:
            ops = GGUFOps
        elif not getattr(ops, "quantized", False):
            raise CheckpointError(f"{file}: holds quantized tensors, which the layers given ({ops}) cannot run")
    with torch.device("meta"):
        model = model_class(cfg, ops=ops, dtype=dtype)
    load_strict(model, sd, file)
    model.variant = detected
    log.info("loaded Sana DiT %s from %s (%s)", detected, file, dtype)
    return model.to(device).eval().requires_grad_(False)


def diffusers_config(cfg: DiTConfig) -> dict:
    """The `transformer/config.json` diffusers writes for this config."""
    return {
        "_class_name": "SanaTransformer2DModel", "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
        "num_attention_heads": cfg.self_heads, "attention_head_dim": cfg.self_head_dim, "num_layers": cfg.depth,
        "num_cross_attention_heads": cfg.cross_heads, "cross_attention_head_dim": cfg.width // cfg.cross_heads,
        "cross_attention_dim": cfg.width, "caption_channels": cfg.caption_channels, "mlp_ratio": cfg.mlp_ratio,
        "dropout": 0.0, "attention_bias": False, "sample_size": cfg.base_size, "patch_size": cfg.patch_size,
        "norm_elementwise_affine": False, "norm_eps": 1e-6,
        "interpolation_scale": cfg.pe_interpolation if cfg.use_pe else None,
        "guidance_embeds": cfg.guidance_embed, "guidance_embeds_scale": cfg.guidance_embeds_scale,
        "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None, "timestep_scale": cfg.timestep_scale,
    }


def save_dit(model: SanaDiT, path: PathLike, layout: str = "diffusers", prefix: str = "",
             dtype: torch.dtype | None = None, shards: int = 1, variant: str | None = None) -> Path:
    """Write a DiT in a real layout: `layout="nvlabs"` to a `.pth` ({"state_dict": ...}) or `.safetensors`;
    `layout="diffusers"` to a folder (config.json + `diffusion_pytorch_model[.variant].safetensors`, split
    into `shards` files with an index) or to a single `.safetensors`. `prefix` is put before every key."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    sd = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    sd = pointwise_kernels(sd, 4)
    if layout == "diffusers":
        sd = nvlabs_to_diffusers(sd)
    elif layout != "nvlabs":
        raise ValueError(f"layout must be 'nvlabs' or 'diffusers', got {layout!r}")
    sd = {prefix + k: v for k, v in sd.items()}
    if path.suffix == ".pth":
        torch.save({"state_dict": sd}, path)
        return path
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(diffusers_config(model.cfg), indent=2))
    stem = f"diffusion_pytorch_model{'.' + variant if variant else ''}"
    if shards == 1:
        save_file(sd, str(path / f"{stem}.safetensors"))
        return path
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: sd[k] for k in part}, str(path / name))
        weight_map.update(dict.fromkeys(part, name))
    (path / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def lora_key_map(cfg: DiTConfig, prefix: str = "diffusion_model.") -> dict[str, str | tuple[str, tuple[int, int, int]]]:
    """LoRA module names -> the weight each patches (under `prefix`), for the formats Sana LoRAs come in:
    diffusers/PEFT (`transformer.transformer_blocks.0.attn1.to_q`, also without `transformer.`), kohya-style
    (`lora_unet_...`, `lora_transformer_...` with `_` for `.`), NVlabs names (`blocks.0.attn.qkv`) and ComfyUI's
    (`diffusion_model.blocks.0.attn.qkv`, what its LoRA trainer writes).
    A part of one of our fused weights (q of qkv, k of kv) maps to (key, (0, first row, rows)): ComfyUI's
    offset patch, which `comfy.lora.load_lora` takes as is."""
    out: dict[str, str | tuple[str, tuple[int, int, int]]] = {}
    for ours, theirs in _key_map(cfg.depth, cfg.qk_norm, cfg.guidance_embed):
        if not ours.endswith(".weight"):
            continue
        target = prefix + ours
        out[ours[: -len(".weight")]] = out[target[: -len(".weight")]] = target  # NVlabs / ComfyUI-trainer names
        for i, name in enumerate(t[: -len(".weight")] for t in theirs):
            value = target if len(theirs) == 1 else (target, (0, i * cfg.width, cfg.width))
            flat = name.replace(".", "_")
            out.update(dict.fromkeys((f"transformer.{name}", name, f"lora_unet_{flat}", f"lora_transformer_{flat}"),
                                     value))
    return out
