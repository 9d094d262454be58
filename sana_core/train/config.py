"""Every training option, once: its name, type, default and help (the CLI flags and config-file keys are the
field names; diffusers' `train_dreambooth_lora_sana.py` names work as aliases, our old names with a deprecation
warning). Resolution order: these defaults < the config file (`--config`, YAML or JSON) < command-line flags.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..spec import SANA
from .lora import DEFAULT_TARGETS
from .recipe import DENSITIES, WEIGHTINGS

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
#: values other tools spell differently (diffusers' --mixed_precision no, --optimizer AdamW)
VALUE_ALIASES = {"dtype": {"no": "fp32"}}


def _opt(default: Any, help: str, aliases: tuple[str, ...] = (), deprecated: tuple[str, ...] = ()) -> Any:
    """An option: `aliases` are other tools' names (diffusers'), `deprecated` our old ones (they warn)."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, (list, tuple)) else {"default": default}
    return field(**kw, metadata={"help": help, "aliases": aliases, "deprecated": deprecated})


def _choice(default: Any, choices: tuple, help: str, aliases: tuple[str, ...] = (),
            deprecated: tuple[str, ...] = ()) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases,
                                            "deprecated": deprecated})


@dataclass
class TrainConfig:
    # data and model
    data_dir: list = _opt([], "image + caption folders (one or several)", ("instance_data_dir",))
    model: str = _opt("Efficient-Large-Model/Sana_600M_512px_diffusers",
                      "the DiT to train: diffusers folder or repo id, NVlabs .pth, single .safetensors, hf:// URL",
                      ("pretrained_model_name_or_path",))
    vae: str = _opt(None, "DC-AE to encode the images (default: the model folder's, else the Sana 1.1 DC-AE)")
    text_encoder: str = _opt(None, "Gemma-2 folder or file (default: the model folder's, else Sana's Gemma-2-2B-IT)")
    output_dir: str = _opt("output/sana-train", "where checkpoints, logs, validation grids and the result go")
    cache_dir: str = _opt(None, "feature cache of DC-AE latents and caption embeddings (default: $XDG_CACHE_HOME "
                          "or ~/.cache, sana_core/train_features; not diffusers' download cache)")
    clear_cache: bool = _opt(False, "delete the feature cache before the run (alone, without --data_dir: delete "
                             "it and exit)")
    resolution: int = _opt(512, "training size in px (a multiple of 32); with --multi_scale the buckets' base size")
    multi_scale: bool = _opt(False, "bucket images by aspect ratio (NVlabs' tables at --resolution)")
    on_bad_data: str = _choice("skip", ("skip", "error"), "bad images/captions: skip them (reported and listed in "
                               "OUTPUT_DIR/bad_data.txt) or refuse to start, listing them")
    min_image_size: int = _opt(None, "shorter image side below this (px) is bad data (default: resolution / 2)")
    # what to train
    mode: str = _choice("lora", ("lora", "full"), "LoRA adapters or every DiT weight")
    lora_rank: int = _opt(4, "LoRA rank (diffusers' default 4)", ("rank",))
    lora_alpha: float = _opt(None, "LoRA alpha (scale alpha / rank; default: the rank, scale 1)")
    lora_targets: list = _opt(DEFAULT_TARGETS, "layers to adapt, diffusers' module names or endings: to_q to_k to_v "
                              "to_out.0 (default: every attention projection), attn1.to_q, attn2, ...; "
                              "diffusers' comma-separated list works too", ("lora_layers",))
    # optimisation
    batch_size: int = _opt(1, "images per process per micro-step; global batch = this x accumulation x processes",
                           ("train_batch_size",))
    gradient_accumulation_steps: int = _opt(1, "micro-steps per optimizer step")
    lr: float = _opt(1e-4, "learning rate (after --scale_lr)", ("learning_rate",))
    scale_lr: str = _choice("none", ("none", "sqrt", "linear"), "NVlabs' auto_lr: lr x (global batch / 256)^(1/2 or 1)")
    optimizer: str = _choice(None, ("adamw", "came"), "default: CAME for full (NVlabs), AdamW for LoRA (diffusers)")
    weight_decay: float = _opt(0.0, "weight decay (NVlabs: 0)", ("adam_weight_decay",))
    warmup_steps: int = _opt(0, "linear warm-up steps, then constant lr (NVlabs pre-training: 2000)",
                             ("lr_warmup_steps",))
    max_grad_norm: float = _opt(None, "gradient clipping (default: 0.1 full as NVlabs, 1.0 LoRA as diffusers; 0 off)")
    max_steps: int = _opt(None, "optimizer steps to train (overrides --num_epochs)", ("max_train_steps",))
    num_epochs: int = _opt(1, "passes over the data (when --max_steps is not given)", ("num_train_epochs",))
    seed: int = _opt(0, "seed of data order, noise, timesteps, caption dropout and LoRA init")
    dtype: str = _choice("auto", PRECISIONS, "compute dtype: bf16/fp16 autocast (mixed precision; weights stay "
                         "fp32); auto: bf16 on CUDA, else fp32", ("mixed_precision",), ("precision",))
    gradient_checkpointing: bool = _opt(False, "recompute each DiT block in the backward pass (less memory, slower)")
    ema_rate: float = _opt(None, "keep an EMA of the trained weights at this rate (NVlabs: 0.9999); saved as *_ema")
    fsdp: bool = _opt(False, "shard the DiT over the processes by block (FSDP full shard; full fine-tunes)")
    device: str = _choice("auto", DEVICES, "auto: the GPU of each process if any (accelerate), cpu: the CPU even if a "
                          "GPU is present, cuda: a GPU or an error", deprecated=("cpu=cpu",))
    # recipe
    weighting_scheme: str = _choice("logit_normal", DENSITIES, "timestep density (NVlabs: logit_normal)")
    logit_mean: float = _opt(0.0, "logit_normal: mean")
    logit_std: float = _opt(1.0, "logit_normal: std")
    mode_scale: float = _opt(1.29, "mode density: scale")
    loss_weighting: str = _choice("none", WEIGHTINGS, "per-sigma loss weight (NVlabs: none; diffusers' sigma_sqrt, "
                                  "cosmap)")
    flow_shift: float = _opt(None, "timestep shift (default: the model's, its scheduler's flow_shift)")
    caption_dropout: float = _opt(0.1, "probability of training a sample on the null caption (NVlabs: 0.1)")
    max_sequence_length: int = _opt(300, "caption tokens")
    # checkpoints, validation, logging
    checkpointing_steps: int = _opt(500, "save a resumable checkpoint every N steps (0: only at the end)")
    checkpoints_total_limit: int = _opt(None, "keep only the newest N checkpoints")
    resume: str = _opt(None, "'latest' (a fresh start when there is none yet) or a checkpoint folder to resume from",
                       ("resume_from_checkpoint",))
    validation_prompts: list = _opt([], "prompts sampled every --validation_steps, saved as a grid",
                                    ("validation_prompt",))
    validation_steps: int = _opt(500, "steps between validation grids")
    validation_sampling_steps: int = _opt(SANA.steps, "Flow-DPM-Solver steps of the validation images")
    validation_guidance_scale: float = _opt(SANA.guidance_scale, "CFG scale of the validation images")
    save_dtype: str = _choice("fp32", ("fp32", "bf16", "fp16"), "dtype of the saved full fine-tune")
    encode_batch_size: int = _opt(4, "images / captions encoded at once when filling the cache")
    progress: bool = _opt(True, "progress bar (loss, lr, speed)")
    verbose: bool = _opt(False, "also accelerate's INFO lines (each checkpoint's files)")

    def resolved_optimizer(self) -> str:
        return self.optimizer or ("came" if self.mode == "full" else "adamw")

    def resolved_max_grad_norm(self) -> float:
        return self.max_grad_norm if self.max_grad_norm is not None else (0.1 if self.mode == "full" else 1.0)

    def validate(self) -> None:
        """ValueError naming the flag for values that cannot work (before anything is loaded)."""
        if not self.data_dir:
            raise ValueError("--data_dir: give at least one image + caption folder")
        positive = ("batch_size", "gradient_accumulation_steps", "num_epochs", "encode_batch_size",
                    "validation_sampling_steps", "max_sequence_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max_steps must be at least 1, got {self.max_steps}")
        if self.resolution <= 0 or self.resolution % 32:
            raise ValueError(f"--resolution {self.resolution} must be a positive multiple of 32")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"--caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.ema_rate is not None and not 0 < self.ema_rate < 1:
            raise ValueError(f"--ema_rate must be in (0, 1), got {self.ema_rate}")
        if self.fsdp and self.mode == "lora":
            raise ValueError("--fsdp shards full fine-tunes; LoRA trains with DDP (drop --fsdp)")
        if self.fsdp and self.validation_prompts:
            raise ValueError("--validation_prompts: validation sampling needs the whole DiT in one process, which "
                             "--fsdp shards; drop one of them")
        for f in fields(self):  # nan / inf cannot be honoured by any number option
            value = getattr(self, f.name)
            if f.type == "float" and value is not None and not math.isfinite(value):
                raise ValueError(f"--{f.name} must be a finite number, got {value}")
        for name in ("checkpointing_steps", "validation_steps", "warmup_steps", "weight_decay", "max_grad_norm",
                     "min_image_size"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lora_rank", "checkpoints_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("flow_shift", "logit_std", "mode_scale", "lora_alpha"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"--{f.name} {value!r}: valid are {', '.join(choices)}")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _value(name: str, value: Any) -> Any:
    """A choice's value as we spell it (lower case; other tools' spellings of the same value mapped)."""
    return VALUE_ALIASES.get(name, {}).get(value.lower(), value.lower()) if isinstance(value, str) else value


def _names(f: Any) -> dict[str, tuple[str, Any]]:
    """Every spelling of a field -> (how it is known: "name" / "alias" / "deprecated", the value a deprecated
    switch spelling stands for, else None)."""
    out = {f.name: ("name", None), **{a: ("alias", None) for a in f.metadata["aliases"]}}
    for old in f.metadata["deprecated"]:
        old, _, value = old.partition("=")
        out[old] = ("deprecated", value or None)
    return out


class _Deprecated(argparse.Action):
    """An old flag: stores its value (or the value it stands for) with a warning naming the new flag."""

    def __init__(self, option_strings: list[str], dest: str, stands_for: Any = None, **kwargs: Any):
        self.stands_for = stands_for
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        new = f"--{self.dest} {self.stands_for}" if self.stands_for is not None else f"--{self.dest}"
        log.warning("%s is deprecated: use %s", option_string, new)
        if self.stands_for is not None:
            if values is False:
                return
            values = self.stands_for
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    """Flags from TrainConfig (a bool: --NAME [BOOL] / --no_NAME); unset flags stay absent (default SUPPRESS) so
    a config file can supply them; mistakes are one line (`cli.OneLineParser`)."""
    from ..cli import OneLineParser

    p = OneLineParser(prog="sana-train", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                      argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML or JSON file of options (keys = the flag names); flags override it")
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        aliases = f.metadata["aliases"]
        also = f"; diffusers: --{', --'.join(aliases)}" if aliases else ""
        off = f"; --no_{f.name}: off" if f.type == "bool" else ""
        help_text = f"{f.metadata['help']} (default: {default}{also}{off})"
        kw: dict[str, Any] = {"help": help_text.replace("%", "%%"), "dest": f.name}
        if f.type == "bool":
            kw.update(nargs="?", const=True, type=_bool, metavar="BOOL")
        elif f.type == "list":
            kw.update(nargs="+")
        elif "choices" in f.metadata:
            kw.update(type=functools.partial(_value, f.name), choices=f.metadata["choices"])
        else:
            kw["type"] = {"int": int, "float": float}.get(f.type, str)
        p.add_argument(f"--{f.name}", *[f"--{a}" for a in aliases], **kw)
        if f.type == "bool":
            p.add_argument(f"--no_{f.name}", dest=f.name, action="store_const", const=False, help=argparse.SUPPRESS)
        for old, (how, value) in _names(f).items():
            if how == "deprecated":
                extra = dict(nargs="?", const=True, type=_bool, metavar="BOOL") if value is not None else \
                    {k: v for k, v in kw.items() if k not in ("help", "dest")}
                p.add_argument(f"--{old}", dest=f.name, action=_Deprecated, stands_for=value,
                               help=argparse.SUPPRESS, **extra)
    return p


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON config: a mapping of option names (or their aliases; old names warn); unknown
    names are an error naming them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # yaml and json raise their own error types
        raise ValueError(f"--config {path}: cannot be parsed ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    spellings = {name: (f.name, how, value) for f in fields(TrainConfig) for name, (how, value) in _names(f).items()}
    unknown = sorted(set(data) - set(spellings))
    if unknown:
        valid = sorted(f.name for f in fields(TrainConfig))
        raise ValueError(f"--config {path}: unknown options {unknown}; valid: {valid}")
    out = {}
    for key, value in data.items():
        name, how, stands_for = spellings[key]
        if how == "deprecated":
            log.warning("--config %s: %r is deprecated: use %r", path, key, name)
            if stands_for is not None:
                if not value:
                    continue
                value = stands_for
        out[name] = value
    return out


def parse(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from defaults < --config file < flags, validated."""
    args = vars(build_parser().parse_args(argv))
    values = read_config_file(args.pop("config")) if "config" in args else {}
    values.update(args)
    for name in ("data_dir", "validation_prompts", "lora_targets"):
        if isinstance(values.get(name), str):
            values[name] = [values[name]]
    if "lora_targets" in values:  # diffusers' --lora_layers "to_k,to_q,to_v"
        values["lora_targets"] = [t.strip() for v in values["lora_targets"] for t in v.split(",") if t.strip()]
    values = {k: _value(k, v) for k, v in values.items()}
    if values.get("clear_cache") and not values.get("data_dir"):
        values["data_dir"] = []  # clear and exit: nothing else is needed
        return TrainConfig(**values)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def dump(cfg: TrainConfig) -> str:
    """The config as JSON (a valid --config file)."""
    return json.dumps(asdict(cfg), indent=2)
