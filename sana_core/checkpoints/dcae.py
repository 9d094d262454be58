"""DC-AE checkpoints: detect the layout, convert to ours (diffusers names), read the config from the weights,
build on meta, load strictly.

Layouts: diffusers `AutoencoderDC` (`encoder.conv_in`, `decoder.up_blocks.I.J...`; ours) and mit-han-lab's
efficientvit (`encoder.project_in.conv`, `...stages.I.op_list.J.main...`, fused `qkv`), either one possibly
behind a wrapper prefix (`vae.`, `first_stage_model.`), in a single file or a folder.
"""
from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..dcae import BLOCKS, DCAE, VARIANTS, DCAEConfig
from .files import (CheckpointError, PathLike, describe_keys, find_weights_file, load_strict,
                    read_json, read_state_dict, strip_prefixes)

log = logging.getLogger(__name__)

DIFFUSERS_ANCHOR, EFFICIENTVIT_ANCHOR = "decoder.conv_in.weight", "decoder.project_in.main.conv.weight"

def config_from_diffusers(config: dict) -> DCAEConfig:
    """Read a diffusers `AutoencoderDC` config.json; ValueError for options no Sana DC-AE uses."""
    n = len(config["encoder_block_out_channels"])

    def stages(key: str, default: Any = None) -> tuple:  # per-stage values; a string means all stages
        v = config[key] if default is None else config.get(key, default)
        return (v,) * n if isinstance(v, str) else tuple(tuple(s) if isinstance(s, list) else s for s in v)

    norms, acts = set(stages("decoder_norm_types", "rms_norm")), set(stages("decoder_act_fns", "silu"))
    if norms != {"rms_norm"} or len(acts) != 1:
        raise ValueError(f"decoder_norm_types {sorted(norms)} / decoder_act_fns {sorted(acts)}: only RMSNorm and "
                         "one activation for all stages are supported (as in every Sana DC-AE)")
    if not (config.get("encoder_out_shortcut", True) and config.get("decoder_in_shortcut", True)):
        raise ValueError("encoder_out_shortcut / decoder_in_shortcut = false is not supported (Sana uses both)")
    enc_blocks, dec_blocks = stages("encoder_block_types"), stages("decoder_block_types")
    return DCAEConfig(
        in_channels=config["in_channels"], latent_channels=config["latent_channels"],
        encoder_widths=stages("encoder_block_out_channels"), encoder_depths=stages("encoder_layers_per_block"),
        encoder_blocks=enc_blocks, encoder_scales=_scales(enc_blocks, stages("encoder_qkv_multiscales")),
        decoder_widths=stages("decoder_block_out_channels"), decoder_depths=stages("decoder_layers_per_block"),
        decoder_blocks=dec_blocks, decoder_scales=_scales(dec_blocks, stages("decoder_qkv_multiscales")),
        attention_head_dim=config.get("attention_head_dim", 32),
        downsample="pixel_unshuffle" if config["downsample_block_type"] == "pixel_unshuffle" else "Conv",
        upsample="interpolate" if config["upsample_block_type"] == "interpolate" else "pixel_shuffle",
        decoder_act=acts.pop(), decoder_out_act=config.get("decoder_conv_act_fn", "relu"),
        scaling_factor=config.get("scaling_factor", 1.0))

def diffusers_config(cfg: DCAEConfig) -> dict:
    """The config.json diffusers writes for this DC-AE."""
    n = len(cfg.encoder_widths)
    return {
        "_class_name": "AutoencoderDC", "_diffusers_version": "0.32.0",
        "in_channels": cfg.in_channels, "latent_channels": cfg.latent_channels,
        "attention_head_dim": cfg.attention_head_dim,
        "encoder_block_types": list(cfg.encoder_blocks), "decoder_block_types": list(cfg.decoder_blocks),
        "encoder_block_out_channels": list(cfg.encoder_widths),
        "decoder_block_out_channels": list(cfg.decoder_widths),
        "encoder_layers_per_block": list(cfg.encoder_depths),
        "decoder_layers_per_block": list(cfg.decoder_depths),
        "encoder_qkv_multiscales": [list(s) for s in cfg.encoder_scales],
        "decoder_qkv_multiscales": [list(s) for s in cfg.decoder_scales],
        "upsample_block_type": cfg.upsample, "downsample_block_type": cfg.downsample,
        "decoder_norm_types": ["rms_norm"] * n, "decoder_act_fns": [cfg.decoder_act] * n,
        "encoder_out_shortcut": True, "decoder_in_shortcut": True,
        "decoder_conv_act_fn": cfg.decoder_out_act, "scaling_factor": cfg.scaling_factor,
    }


def _scales(blocks: tuple[str, ...], scales: tuple) -> tuple[tuple[int, ...], ...]:
    """Multi-scale kernel sizes, kept only for EfficientViT stages (ResBlocks have none)."""
    return tuple(tuple(s) if b == BLOCKS[1] else () for b, s in zip(blocks, scales))


#: efficientvit -> ours, applied in order to every key (ResidualBlock `main` and OpSequential `op_list` wrappers
#: go; so does the ConvLayer `.conv` around each nn.Conv2d, except in resamplers where diffusers keeps one).
_FROM_EFFICIENTVIT = [
    (r"\.main\.", "."), (r"\.op_list\.", "."),
    (r"\.conv\.(weight|bias)$", r".\1"),
    (r"^encoder\.stages\.(\d+)\.(\d+)\.(weight|bias)$", r"encoder.stages.\1.\2.conv.\3"),  # stride-2 conv downsampler
    (r"^encoder\.project_in\.", "encoder.conv_in."), (r"^encoder\.project_out\.0\.", "encoder.conv_out."),
    (r"^decoder\.project_in\.", "decoder.conv_in."), (r"^decoder\.project_out\.0\.", "decoder.norm_out."),
    (r"^decoder\.project_out\.2\.", "decoder.conv_out."),
    (r"^encoder\.stages\.", "encoder.down_blocks."), (r"^decoder\.stages\.", "decoder.up_blocks."),
    (r"\.context_module\.", ".attn."), (r"\.local_module\.", ".conv_out."),
    (r"\.aggreg\.(\d+)\.0\.", r".to_qkv_multiscale.\1.proj_in."),
    (r"\.aggreg\.(\d+)\.1\.", r".to_qkv_multiscale.\1.proj_out."),
    (r"\.proj\.norm\.", ".norm_out."), (r"\.proj\.weight$", ".to_out.weight"),
    (r"\.(conv2|point_conv)\.norm\.", ".norm."),
    (r"\.inverted_conv\.", ".conv_inverted."), (r"\.depth_conv\.", ".conv_depth."), (r"\.point_conv\.", ".conv_point."),
]

#: ours -> efficientvit (after fusing to_q/k/v into `attn.qkv` and renaming `attn.to_out` to `attn.proj`).
_TO_EFFICIENTVIT = [
    (r"\.attn\.to_qkv_multiscale\.(\d+)\.proj_in\.", r".context_module.main.aggreg.\1.0."),
    (r"\.attn\.to_qkv_multiscale\.(\d+)\.proj_out\.", r".context_module.main.aggreg.\1.1."),
    (r"\.attn\.(qkv|proj)\.", r".context_module.main.\1.conv."),
    (r"\.attn\.norm_out\.", ".context_module.main.proj.norm."),
    (r"(\.\d+)\.conv_out\.norm\.", r"\1.local_module.main.point_conv.norm."),
    (r"(\.\d+)\.conv_out\.conv_(inverted|depth|point)\.", r"\1.local_module.main.\2_conv.conv."),
    (r"(\.\d+)\.norm\.", r"\1.main.conv2.norm."),
    (r"(\.\d+)\.(conv1|conv2)\.", r"\1.main.\2.conv."),
    (r"(_blocks\.\d+\.\d+)\.conv\.", r"\1.main.conv.conv."),  # resamplers (a stride-2 conv has one .conv less)
    (r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.", r"\1.stages.\3.op_list."),
    (r"^encoder\.conv_in\.", "encoder.project_in.conv."),
    (r"^encoder\.conv_out\.", "encoder.project_out.main.op_list.0.conv."),
    (r"^decoder\.conv_in\.", "decoder.project_in.main.conv."),
    (r"^decoder\.norm_out\.", "decoder.project_out.op_list.0."),
    (r"^decoder\.conv_out\.", "decoder.project_out.op_list.2.conv."),
]

def detect_layout(sd: dict[str, torch.Tensor], source: PathLike | str) -> str:
    """"diffusers" or "efficientvit"; CheckpointError (saying what was found) for anything else."""
    if EFFICIENTVIT_ANCHOR in sd:
        return "efficientvit"
    if DIFFUSERS_ANCHOR in sd and any(re.match(r"decoder\.up_blocks\.\d+\.\d+\.", k) for k in sd):
        return "diffusers"
    raise CheckpointError(
        f"{source}: not a DC-AE (Sana autoencoder): {describe_keys(sd)}; expected diffusers AutoencoderDC keys "
        f"('{DIFFUSERS_ANCHOR}', 'decoder.up_blocks.N.M...') or efficientvit keys ('{EFFICIENTVIT_ANCHOR}', "
        "'decoder.stages.N.op_list.M...')")


def from_efficientvit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """efficientvit keys -> ours: renames, fused qkv split in thirds, 1x1 conv kernels to linear weights."""
    out = {}
    for key, t in sd.items():
        for pattern, repl in _FROM_EFFICIENTVIT:
            key = re.sub(pattern, repl, key)
        if key.endswith(".attn.qkv.weight"):
            for part, third in zip("qkv", t.flatten(1).chunk(3)):  # own storage each, as in diffusers files
                out[key.replace(".qkv.", f".to_{part}.")] = third.clone()
        else:
            out[key] = t.flatten(1) if key.endswith(".attn.to_out.weight") else t
    return out


def to_efficientvit(sd: dict[str, torch.Tensor], cfg: DCAEConfig) -> dict[str, torch.Tensor]:
    """Ours -> efficientvit keys (the inverse of `from_efficientvit`); used to write test files."""
    out = {}
    for key, t in sd.items():
        if key.endswith((".attn.to_k.weight", ".attn.to_v.weight")):
            continue
        if key.endswith(".attn.to_q.weight"):
            key, t = key.replace(".to_q.", ".qkv."), torch.cat([sd[key.replace(".to_q.", f".to_{p}.")] for p in "qkv"])
        if key.endswith((".attn.qkv.weight", ".attn.to_out.weight")):
            key, t = key.replace(".to_out.", ".proj."), t[:, :, None, None]
        stride_conv = cfg.downsample == "Conv" and re.match(r"encoder\.down_blocks\.\d+\.\d+\.conv\.", key)
        for pattern, repl in _TO_EFFICIENTVIT:
            key = re.sub(pattern, repl, key)
        out[key.replace(".main.conv.conv.", ".main.conv.") if stride_conv else key] = t.contiguous()
    return out


def _stages(sd: dict[str, torch.Tensor], prefix: str) -> list[dict[int, dict[str, torch.Size]]]:
    """Per stage: {op index: {parameter suffix: shape}} for keys `{prefix}.I.J.suffix`."""
    found: dict[int, dict[int, dict[str, torch.Size]]] = {}
    for key, t in sd.items():
        if m := re.match(rf"{re.escape(prefix)}\.(\d+)\.(\d+)\.(.+)$", key):
            found.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = t.shape
    return [found.get(i, {}) for i in range(max(found, default=-1) + 1)]


def _read_side(sd: dict[str, torch.Tensor], side: str) -> dict[str, Any]:
    """Per-stage widths, depths, block types, multi-scale kernels, plus head dims and resampler output
    channels {stage: channels} of the encoder or the decoder (our layout)."""
    out: dict[str, Any] = {"widths": [], "depths": [], "blocks": [], "scales": [], "head_dims": set(), "resamplers": {}}
    for i, ops in enumerate(_stages(sd, f"{side}.down_blocks" if side == "encoder" else f"{side}.up_blocks")):
        body = [p for p in ops.values() if "conv.weight" not in p]  # resamplers hold only conv.weight/bias
        out["resamplers"].update({i: p["conv.weight"][0] for p in ops.values() if "conv.weight" in p})
        kinds = {"ResBlock" if "conv1.weight" in p else "EfficientViTBlock" for p in body}
        if len(kinds) > 1:
            raise CheckpointError(f"stage {i} of the {side} mixes ResBlocks and EfficientViT blocks")
        first = body[0] if body else {}
        n_scales = sum(k.endswith(".proj_in.weight") for k in first)
        out["scales"].append(tuple(first[f"attn.to_qkv_multiscale.{s}.proj_in.weight"][-1] for s in range(n_scales)))
        out["head_dims"] |= {first[f"attn.to_qkv_multiscale.{s}.proj_out.weight"][1] for s in range(n_scales)}
        width = first["conv1.weight"][0] if "conv1.weight" in first else first["attn.to_q.weight"][1] if first else 0
        out["widths"].append(width)
        out["depths"].append(len(body))
        out["blocks"].append(kinds.pop() if kinds else "ResBlock")
    return out


def _decoder_structure(c: DCAEConfig) -> tuple:
    return c.decoder_depths, tuple(b for b, d in zip(c.decoder_blocks, c.decoder_depths) if d), c.upsample


def variant_of(cfg: DCAEConfig) -> str | None:
    """The Sana DC-AE whose decoder structure (depths, block types, upsampling) `cfg` has, widths aside.
    1.0 and 1.1 share one architecture and are reported as "dc-ae-f32c32-sana-1.0"."""
    return next((name for name, c in VARIANTS.items() if _decoder_structure(c) == _decoder_structure(cfg)), None)


def infer_config(sd: dict[str, torch.Tensor], source: PathLike | str = "weights") -> tuple[str, DCAEConfig]:
    """(variant, config) of an our-layout state dict (encoder optional), read from its keys and shapes.

    Widths, depths, block types, multi-scale kernels, head dim and resampler kinds come from the weights; the
    decoder's structure names the variant (`variant_of`), which supplies what weights cannot show: the
    activations, the encoder of a decoder-only file and, without multi-scale branches, the head dim. An empty
    decoder stage 0 stores no width (nor uses one); it is set to half of stage 1's, as in every DC-AE.
    """
    try:
        dec = _read_side(sd, "decoder")
        if not dec["depths"][0]:
            dec["widths"][0] = dec["widths"][1] // 2
        w = dec["widths"]
        upsample = "interpolate" if all(c == w[i] for i, c in dec["resamplers"].items()) else "pixel_shuffle"
        if "decoder.conv_out.weight" in sd:
            in_channels = sd["decoder.conv_out.weight"].shape[0]
        else:  # the decoder ends in an upsampler (empty stage 0)
            in_channels = sd["decoder.conv_out.conv.weight"].shape[0] // (1 if upsample == "interpolate" else 4)
        fields = dict(in_channels=in_channels, latent_channels=sd["decoder.conv_in.weight"].shape[1], upsample=upsample,
                      decoder_widths=tuple(w), decoder_depths=tuple(dec["depths"]), decoder_blocks=tuple(dec["blocks"]),
                      decoder_scales=tuple(dec["scales"]))
        head_dims = dec["head_dims"]
        if "encoder.conv_in.weight" in sd:
            enc = _read_side(sd, "encoder")
            ew = enc["widths"]
            conv_down = all(c == ew[i + 1] for i, c in enc["resamplers"].items())
            fields.update(encoder_widths=tuple(ew), encoder_depths=tuple(enc["depths"]),
                          encoder_blocks=tuple(enc["blocks"]), encoder_scales=tuple(enc["scales"]),
                          downsample="Conv" if conv_down else "pixel_unshuffle")
            head_dims |= enc["head_dims"]
        if len(head_dims) > 1:
            raise CheckpointError(f"{source}: several attention head dims {sorted(head_dims)}")
        if head_dims:
            fields["attention_head_dim"] = head_dims.pop()
        name = variant_of(replace(VARIANTS["dc-ae-f32c32-sana-1.0"], **fields))
        if name is None:
            depths, blocks, up = _decoder_structure(replace(VARIANTS["dc-ae-f32c32-sana-1.0"], **fields))
            raise CheckpointError(f"{source}: unknown DC-AE decoder (depths {depths}, blocks {blocks}, "
                                  f"{up} upsampling); known: {', '.join(VARIANTS)}")
        return name, replace(VARIANTS[name], **fields)
    except CheckpointError as e:
        raise CheckpointError(str(e) if str(e).startswith(str(source)) else f"{source}: {e}") from None
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"{source}: incomplete or inconsistent DC-AE weights ({type(e).__name__}: {e})") from e


def _locate(path: Path) -> tuple[Path, dict | None]:
    """The weight file and, for a diffusers folder, its config.json (a pipeline root means its vae/)."""
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if (path / "model_index.json").is_file():
        path = path / "vae"
    config = read_json(path / "config.json") if (path / "config.json").is_file() else None
    return find_weights_file(path, ("diffusion_pytorch_model", "model")), config


def load_dcae(path: PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              ops: Any = None) -> DCAE:
    """Load a Sana DC-AE from a single `.safetensors`/`.pth` (diffusers or efficientvit keys, any wrapper
    prefix) or a folder: diffusers (`config.json` + `diffusion_pytorch_model*.safetensors`), efficientvit
    (`model.safetensors`) or a Sana diffusers pipeline root (its `vae/`).

    A decoder-only file gives a model that decodes and refuses to encode. The variant is in `model.variant`.
    Raises CheckpointError for anything that is not a complete DC-AE, before any model exists.
    """
    file, config = _locate(Path(path))
    sd = strip_prefixes(read_state_dict(file, dtype), (DIFFUSERS_ANCHOR, EFFICIENTVIT_ANCHOR))
    layout = detect_layout(sd, file)
    if layout == "efficientvit":
        sd = from_efficientvit(sd)
    if config is not None and config.get("_class_name") == "AutoencoderDC":
        try:
            cfg = config_from_diffusers(config)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file.parent / 'config.json'}: unusable AutoencoderDC config "
                                  f"({type(e).__name__}: {e})") from e
        variant = variant_of(cfg) or "custom"
    else:
        variant, cfg = infer_config(sd, file)
    has_encoder = "encoder.conv_in.weight" in sd
    with torch.device("meta"):
        model = DCAE(cfg, ops=ops, encoder=has_encoder)
    load_strict(model, sd, file)
    model.source, model.variant = str(file), variant
    log.info("loaded DC-AE %s (%s layout%s) from %s (%s)", variant, layout,
             "" if has_encoder else ", decoder only", file, dtype)
    # channels-last: the layout CPU (oneDNN) and GPU (cuDNN tensor cores) convolutions run fastest in
    return model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
