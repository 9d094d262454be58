"""`sana-generate` / `python -m sana_core.cli`: text-to-image from the command line (the job of NVlabs'
`scripts/inference.py`).

    sana-generate --prompt "a cyberpunk cat" --output_dir output
    sana-generate --txt_file prompts.txt --model ./Sana_600M_1024px_diffusers --name_by prompt
    sana-generate --json_file prompts.json --dit Sana_1600M_1024px.pth --vae dc-ae --text_encoder gemma
    sana-generate --prompt "a red fox" --image photo.png --mask mask.png   # inpainting (white = repaint)
    sana-generate --prompt "a castle" --controlnet Efficient-Large-Model/Sana_600M_1024px_ControlNet_HED \\
        --dit Efficient-Large-Model/Sana_600M_1024px_ControlNet_HED --control_image scribble.png

A txt file holds one prompt a line (blank lines and lines starting with # are skipped). A json file holds a
list of prompts or records, or an object mapping names to prompts or records; a record has "prompt" and may
set the options marked [record] below (relative paths are looked up next to the json file when they are not
found from the working folder); other fields are ignored with one warning. Every PNG carries its prompt and
settings in its metadata ("sana": a json record of this CLI's option names).

NVlabs' flags and sampler names work too (--cfg_scale, --pag_scale, --bs, --step, --model_path, --work_dir,
--sampling_algo flow_dpm-solver | flow_euler | scm), as do diffusers' argument names (--num_inference_steps,
--pag_applied_layers). Defaults marked "model's" come from the loaded model (`sana_core.spec`).
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .precision import DTYPES, default_device, default_dtype
from .spec import LATENT_FACTOR, SANA, SPRINT

log = logging.getLogger("sana_core.cli")

DEFAULT_PROMPT = 'a cyberpunk cat with a neon sign that says "Sana"'
#: NVlabs' `--sampling_algo` names -> ours; their non-flow samplers cannot sample Sana's flow models
NVLABS_SAMPLERS = {"flow_dpm-solver": "flow_dpmpp_2m", "flow_euler": "flow_euler", "scm": "scm"}
NON_FLOW_SAMPLERS = ("dpm-solver", "sa-solver")


# ------------------------------------------------------------------------------ value types (flags and records)


def positive_int(value: Any) -> int:
    """An integer >= 1 (a json float must be whole)."""
    v = whole(value)
    if v < 1:
        raise ValueError(f"must be at least 1, got {v}")
    return v


def whole(value: Any) -> int:
    """An integer from a flag string or a json number (2.0 is 2; 2.5 is an error, never truncated)."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected an integer, got {value!r}") from None


def finite(value: Any) -> float:
    """A finite float (nan and inf cannot be honoured: they would silently turn guidance off)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"expected a finite number, got {value!r}")
    return v


def non_negative(value: Any) -> float:
    v = finite(value)
    if v < 0:
        raise ValueError(f"must be >= 0, got {v:g}")
    return v


def fraction(value: Any) -> float:
    v = finite(value)
    if not 0 <= v <= 1:
        raise ValueError(f"must be in [0, 1], got {v:g}")
    return v


def strength(value: Any) -> float:
    v = finite(value)
    if not 0 < v <= 1:
        raise ValueError(f"must be in (0, 1], got {v:g}")
    return v


def block_index(value: Any) -> int:
    v = whole(value)
    if v < 0:
        raise ValueError(f"block indices start at 0, got {v}")
    return v


def sampler_name(value: Any) -> str:
    """Our sampler names, or NVlabs' (`flow_dpm-solver` = `flow_dpmpp_2m`)."""
    from .samplers import SAMPLERS

    name = NVLABS_SAMPLERS.get(str(value), str(value))
    if name in SAMPLERS:
        return name
    if name in NON_FLOW_SAMPLERS:
        raise ValueError(f"{name!r} is NVlabs' sampler for diffusion (non-flow) models; Sana samples with "
                         "flow_dpm-solver (= flow_dpmpp_2m), flow_euler or scm (Sprint)")
    raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)} (NVlabs: {', '.join(NVLABS_SAMPLERS)})")


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


# ------------------------------------------------------------------------------ the options table


@dataclass(frozen=True)
class Option:
    """One option: its flag (`--name`), json record key and PNG metadata key are all `name`."""

    name: str
    help: str
    type: Callable[[Any], Any] | None = text  # None: a switch, --name / --no_name
    default: Any = None                      # None with "model's" in the help: from the model's spec
    record: bool = False                     # a json record may set it for its prompt
    setting: str | None = None               # the `SanaPipeline.__call__` argument it feeds, if any
    aliases: tuple[str, ...] = ()            # NVlabs' / diffusers' names, same meaning (listed in --help)
    deprecated: tuple[str, ...] = ()         # our old spellings: still work, with a warning
    choices: tuple[str, ...] | None = None
    nargs: str | None = None
    append: bool = False                     # repeatable flag; a record gives a list
    metavar: str | None = None
    group: str = "generation"

    @property
    def flags(self) -> list[str]:
        if self.type is None:
            return [f"--{self.name}", f"--no_{self.name}"]
        return [f"--{n}" for n in (self.name, *self.aliases)]

    def parse(self, value: Any, where: str) -> Any:
        """A record's value for this option, checked as the flag's (ValueError naming `where` and the field)."""
        try:
            if self.type is None:
                if not isinstance(value, bool):
                    raise ValueError(f"expected true or false, got {value!r}")
                return value
            if self.append or self.nargs:
                values = value if isinstance(value, list) else [value]
                return tuple(self.type(v) for v in values)
            out = self.type(value)
        except ValueError as e:
            raise ValueError(f"{where}: \"{self.name}\" {e}") from None
        if self.choices and out not in self.choices:
            raise ValueError(f"{where}: \"{self.name}\" {out!r}: valid are {', '.join(self.choices)}")
        return out


def _compile_modes() -> tuple[str, ...]:
    from .pipeline import COMPILE_MODES

    return COMPILE_MODES


def _default_model() -> str:
    from .pipeline import DEFAULT_MODEL

    return DEFAULT_MODEL


OPTIONS: tuple[Option, ...] = (
    # what to make
    Option("prompt", f"one prompt (default: {DEFAULT_PROMPT!r})", group="prompts"),
    Option("txt_file", "one prompt a line", group="prompts"),
    Option("json_file", "prompt records (see above)", group="prompts"),
    Option("name_by", "file names: 'index' (00000.png, 00001.png, ...; json objects: their keys) or 'prompt' "
           "(NVlabs: the prompt's first 100 characters, made file-safe; repeats get _1, _2)", default="index",
           choices=("index", "prompt"), group="prompts"),
    Option("negative_prompt", "negative prompt (CFG; Sana-Sprint has none: a warning, not used)", default="",
           record=True, setting="negative_prompt"),
    Option("seed", "seed of the first image; image j of the file gets seed + j (a record's seed: its own)",
           type=whole, default=0, record=True),
    Option("height", "pixels, a multiple of 32 (default: the model's size)", type=whole, record=True,
           setting="height"),
    Option("width", "pixels, a multiple of 32 (default: the model's size)", type=whole, record=True,
           setting="width"),
    Option("steps", f"sampling steps (default: the model's, {SANA.steps}; Sprint {SPRINT.steps})",
           type=positive_int, record=True, setting="num_inference_steps", aliases=("num_inference_steps", "step")),
    Option("guidance_scale", f"CFG scale (Sprint: embedded guidance) (default: the model's, {SANA.guidance_scale})",
           type=finite, record=True, setting="guidance_scale", aliases=("cfg_scale",)),
    Option("pag_scale", "perturbed-attention guidance scale; 0 (default) turns PAG off", type=non_negative,
           default=0.0, record=True, setting="pag_scale", deprecated=("pag_guidance_scale",)),
    Option("pag_layers", "blocks whose self-attention PAG perturbs (default: the model's, "
           f"{' '.join(map(str, SANA.pag_layers))})", type=block_index,
           nargs="+", record=True, setting="pag_applied_layers", aliases=("pag_applied_layers",)),
    Option("sampler", "flow_dpmpp_2m, flow_euler or scm (NVlabs: flow_dpm-solver = flow_dpmpp_2m) (default: the "
           "model's; scm for Sprint)", type=sampler_name, record=True, setting="sampler", aliases=("sampling_algo",)),
    Option("flow_shift", "timestep shift (default: the model's, its scheduler's flow_shift)", type=finite,
           record=True, setting="shift", deprecated=("shift",)),
    Option("chi", "put Sana's complex human instruction before each prompt (--no_chi: the bare prompt)",
           type=None, default=True, setting="use_chi"),
    Option("complex_human_instruction", "replace Sana's complex human instruction with this text",
           setting="complex_human_instruction"),
    Option("max_sequence_length", "caption tokens", type=positive_int, default=300, setting="max_sequence_length"),
    Option("truncate_timesteps", "feed the DiT int(1000 sigma) as NVlabs and diffusers' DPM-Solver do; "
           "--no_truncate_timesteps with --sampler flow_euler matches diffusers' FlowMatchEulerDiscreteScheduler "
           "(default: the model's, on)", type=None, setting="truncate_timesteps",
           deprecated=("no-truncate_timesteps",)),
    Option("max_timesteps", "Sana-Sprint: the first SCM time (default: the model's)", type=finite,
           setting="max_timesteps"),
    Option("intermediate_timesteps", "Sana-Sprint: the middle SCM time of a 2-step run (default: the model's)",
           type=finite, setting="intermediate_timesteps"),
    Option("resolution_binning", "any --height/--width: generate at the model's nearest training bucket and "
           "resize + crop to the size asked (diffusers' use_resolution_binning)", type=None, default=False,
           setting="use_resolution_binning"),
    Option("tiled_decode", "force (or forbid) tiled DC-AE decoding; default decides from free memory", type=None,
           setting="tiled_decode", deprecated=("no-tiled_decode",)),
    # image-to-image, inpainting, ControlNet
    Option("image", "image-to-image / inpainting: the picture to start from (resized and centre-cropped to the "
           "size)", record=True, group="image inputs"),
    Option("mask", "inpainting: white (or transparent) = repaint, black = keep; needs --image", record=True,
           group="image inputs"),
    Option("strength", "how much of the schedule runs on --image (0-1; default 0.6 for image-to-image, 1.0 when "
           "inpainting): as ComfyUI's denoise, the last steps of a steps/strength schedule, so --steps steps "
           "always run. diffusers' SanaSprintImg2ImgPipeline(num_inference_steps=N, strength=s) instead runs "
           "the last k = N - int(N - N s) of N steps: the same image as --steps k --strength k/N",
           type=strength, record=True, group="image inputs"),
    Option("controlnet", "a Sana ControlNet (NVlabs .pth or repo id, which may also be --dit; diffusers folder); "
           "repeat for several", append=True, metavar="PATH", group="image inputs"),
    Option("control_image", "the control image of each --controlnet, in order (HED: white scribbles on black; any "
           "size, resized and centre-cropped)", append=True, record=True, metavar="PATH", group="image inputs"),
    Option("control_scale", "ControlNet strength: one for all or one per --controlnet (default 1)", type=finite,
           append=True, metavar="SCALE", group="image inputs"),
    Option("control_start", "fraction of the steps before the ControlNets act", type=fraction, default=0.0,
           group="image inputs"),
    Option("control_end", "fraction of the steps after which they stop", type=fraction, default=1.0,
           group="image inputs"),
    # the model
    Option("model", "diffusers Sana folder, Hugging Face repo id or hf:// URL (default: %(default)s)",
           default=None, group="model"),
    Option("dit", "DiT checkpoint instead of the model's (NVlabs .pth, safetensors, folder, hf://)",
           aliases=("model_path",), group="model"),
    Option("vae", "DC-AE file or folder instead of the model's", group="model"),
    Option("text_encoder", "Gemma-2 folder or single file instead of the model's", group="model"),
    Option("lora", "merge a Sana LoRA into the DiT (repeat for several; scale default 1)", append=True,
           metavar="PATH[:SCALE]", group="model"),
    Option("variant", "weight files to download from a hub repo: fp16, bf16, or 'none' for the full precision "
           "files (default: from --dtype)", group="model"),
    Option("dtype", "weights' dtype (compute precision); auto: bf16 on a CUDA GPU that has it, else fp32 (as the "
           "trainer's --dtype auto)", default="auto", choices=("auto", *DTYPES), group="model"),
    Option("device", "cuda, cuda:1, cpu, mps (default: cuda if available; under torchrun its LOCAL_RANK's GPU)",
           group="model"),
    Option("use_pe", "force the 2K/4K sin-cos positional embedding on/off (default: detected)", type=None,
           deprecated=("no-use_pe",), group="model"),
    Option("offload", "keep idle models on the CPU (small GPUs)", type=None, default=False, group="model"),
    Option("offload_blocks", "--offload, and the DiT's blocks stay on the CPU too, each streamed to the GPU just "
           "before its turn (DiTs larger than the GPU, e.g. the 4.8B on 8 GB)", type=None, default=False,
           group="model"),
    Option("compile", "torch.compile the DiT, optionally naming the mode (reduce-overhead: CUDA graphs); pays off "
           "over many images: the first one includes compiling", nargs="?", group="model"),
    # the run
    Option("output_dir", "where the PNGs go", default="output", aliases=("work_dir",), group="run"),
    Option("batch_size", "prompts generated together (images do not depend on it)", type=positive_int, default=1,
           aliases=("bs",), group="run"),
    Option("num_images_per_prompt", "images of each prompt (seeds count up)", type=positive_int, default=1,
           group="run"),
    Option("start_index", "first prompt of the file to make (0-based)", type=whole, group="run"),
    Option("end_index", "stop before this prompt", type=whole, group="run"),
    Option("skip_existing", "leave out images whose PNG is already in --output_dir (resume an interrupted run)",
           type=None, default=False, group="run"),
    Option("progress", "progress bars (--no_progress: none)", type=None, default=True, group="run"),
    Option("preview_every", "every N steps write a preview of each image to --output_dir/previews/<name>_stepNNN.png "
           "(full size with --preview_decoder, else 1/32 size from a linear map)", type=positive_int, group="run"),
    Option("preview_decoder", "TAESANA's decoder (taesana_decoder.pth / .safetensors from github.com/madebyollin/"
           "taesd) for full-size --preview_every previews", group="run"),
)
BY_NAME = {o.name: o for o in OPTIONS}
#: every key a json record may hold -> its option (aliases and old names included)
RECORD_KEYS = {key: o for o in OPTIONS if o.record for key in (o.name, *o.aliases, *o.deprecated)}
PATH_FIELDS = ("image", "mask", "control_image")  # record fields naming files


class _Action(argparse.Action):
    """Stores an option's value; a switch stores True / False (--no_NAME); an old spelling warns once."""

    def __init__(self, option_strings: list[str], dest: str, kind: str = "store", use: str | None = None,
                 **kwargs: Any):
        self.kind, self.use = kind, use
        if kind == "switch":
            kwargs["nargs"] = 0
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if self.use:
            log.warning("%s is deprecated: use %s", option_string, self.use)
        if self.kind == "switch":
            values = not re.match(r"--no[_-]", option_string or "")
        elif self.kind == "append":
            values = [*(getattr(namespace, self.dest) or []), values]
        setattr(namespace, self.dest, values)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line (not the whole usage), with the nearest flag for a misspelt one."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = ""
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            flags = [s for a in self._actions for s in a.option_strings]
            close = difflib.get_close_matches(unknown.group(1).split("=")[0], flags, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}; --help lists every flag\n")


def _argparse_type(option: Option) -> Callable[[str], Any]:
    """The option's type for argparse: a ValueError becomes argparse's message naming the flag."""
    def convert(value: str) -> Any:
        try:
            return option.type(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = option.type.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    """The flags of `OPTIONS` (old spellings hidden from --help but accepted with a deprecation warning)."""
    p = OneLineParser(prog="sana-generate", description=__doc__, allow_abbrev=False,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for o in OPTIONS:
        group = groups.setdefault(o.group, p.add_argument_group(o.group))
        default = _default_model() if o.name == "model" else o.default
        kw: dict[str, Any] = {"dest": o.name, "default": default, "action": _Action,
                              "help": o.help + (" [record]" if o.record else "")}
        if o.type is None:
            kw["kind"] = "switch"
        else:
            kw.update(type=_argparse_type(o), kind="append" if o.append else "store")
            kw.update({k: v for k, v in (("nargs", o.nargs), ("choices", o.choices), ("metavar", o.metavar)) if v})
            if o.name == "compile":
                kw.update(const="default", choices=_compile_modes())
        group.add_argument(*o.flags, **kw)
        for old in o.deprecated:
            new = f"--no_{o.name}" if old.startswith("no-") else f"--{o.name}"
            group.add_argument(f"--{old}", **{**kw, "help": argparse.SUPPRESS, "use": new})
    return p


# ------------------------------------------------------------------------------ prompts and the plan


def _read_text(path: Path, flag: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path}: not UTF-8 text ({e})") from None


def read_prompts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The prompt records the arguments ask for, each at least {"prompt": ...}, record fields checked (by the
    options' own types) and named by their option; unknown fields are dropped with one warning."""
    if args.txt_file:
        path = Path(args.txt_file)
        lines = [ln.strip() for ln in _read_text(path, "--txt_file").splitlines()]
        records = [{"prompt": ln} for ln in lines if ln and not ln.startswith("#")]
    elif args.json_file:
        path = Path(args.json_file)
        try:
            data = json.loads(_read_text(path, "--json_file"))
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, (list, dict)):
            raise ValueError(f"{path}: expected a list of prompts/records or an object of them")
        items = list(data.items()) if isinstance(data, dict) else list(enumerate(data))
        records, unknown = [], {}
        for key, item in items:
            raw = {"prompt": item} if isinstance(item, str) else item
            if not isinstance(raw, dict) or not isinstance(raw.get("prompt"), str):
                raise ValueError(f"{path}: entry {key!r} must be a prompt string or an object with a \"prompt\" string")
            rec: dict[str, Any] = {"prompt": raw["prompt"]}
            if isinstance(data, dict):
                rec["name"] = str(key)
            for field, value in raw.items():
                option = RECORD_KEYS.get(field)
                if field in ("prompt", "name"):
                    rec[field] = str(value)
                elif option is None:
                    unknown.setdefault(field, []).append(key)
                elif value is not None:
                    if field in option.deprecated:
                        log.warning("%s: the record field %r is deprecated: use %r", path, field, option.name)
                    rec[option.name] = option.parse(value, f"{path}: entry {key!r}")
            for field in PATH_FIELDS:
                if field in rec:
                    rec[field] = _record_paths(rec[field], path, key, field)
            records.append(rec)
        if unknown:
            log.warning("%s: ignoring fields no option reads: %s; a record may set %s", path,
                        ", ".join(f"{f!r} ({len(k)} entries)" for f, k in unknown.items()),
                        ", ".join(["prompt", "name", *sorted({o.name for o in RECORD_KEYS.values()})]))
    else:
        return [{"prompt": args.prompt if args.prompt is not None else DEFAULT_PROMPT}]
    if not records:
        raise ValueError(f"{path}: holds no prompts")
    return records


def _record_paths(value: str | tuple[str, ...], json_path: Path, key: Any, field: str) -> str | tuple[str, ...]:
    """A record's file path(s), each existing as given or next to the json file."""
    values = value if isinstance(value, tuple) else (value,)
    out = []
    for v in values:
        found = Path(v) if Path(v).exists() else json_path.parent / v
        if not found.exists():
            raise FileNotFoundError(f"{json_path}: entry {key!r}: {field} {v!r} not found (nor next to the json file)")
        out.append(str(found))
    return tuple(out) if isinstance(value, tuple) else out[0]


def safe_name(prompt: str) -> str:
    """NVlabs' prompt-based file name: the first 100 characters, with path separators and characters that
    file systems refuse replaced by '_'."""
    name = re.sub(r'[\\/:*?"<>|\x00-\x1f]', "_", prompt[:100]).strip().rstrip(".")
    return name or "_"


def plan_images(records: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One entry per image this process makes, each with its name and seed.

    `--start_index`/`--end_index` slice the prompts (NVlabs' flags); each prompt makes `--num_images_per_prompt`
    images; image j of the whole file is named after its prompt's index (`NNNNN`), its record's name or with
    `--name_by prompt` its text (`safe_name`; a repeated name gets `_1`, `_2`, ...), plus `_k` for copies, and
    seeded `--seed + j` unless its record sets a seed (then seed + k). Under torchrun / accelerate (`RANK`,
    `WORLD_SIZE`) each process takes every WORLD_SIZE-th image; with `--skip_existing` images already in the
    output folder are left out. So an image never depends on its batch, its process or the slice.
    """
    n = args.num_images_per_prompt
    names, used = [], set()
    for i, rec in enumerate(records):
        base = rec.get("name") or (safe_name(rec["prompt"]) if args.name_by == "prompt" else f"{i:05d}")
        base = safe_name(base) if "name" in rec else base
        name, k = base, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names.append(name)
    images = []
    for i, rec in list(enumerate(records))[args.start_index:args.end_index]:
        for k in range(n):
            seed = rec["seed"] + k if "seed" in rec else args.seed + i * n + k
            images.append({**rec, "name": names[i] if n == 1 else f"{names[i]}_{k}", "seed": seed})
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    images = images[rank::world]
    if args.skip_existing:
        images = [im for im in images if not (Path(args.output_dir) / f"{im['name']}.png").exists()]
    return images


def plan_jobs(images: list[dict[str, Any]], args: argparse.Namespace) -> list[tuple[dict, list[dict]]]:
    """Group images into batches of up to `--batch_size` that share every setting but the prompt and seed.
    A job's settings are keyed by option name: the per-image options (`Option.setting`, a record's value over
    the flag's), image / mask / strength / control_image; None = the model's default (`resolve_defaults`)."""
    jobs: list[tuple[dict, list[dict]]] = []
    for rec in images:
        settings = {o.name: rec.get(o.name, getattr(args, o.name)) for o in OPTIONS
                    if o.setting or o.name in ("image", "mask", "strength", "control_image")}
        settings["control_image"] = tuple(settings["control_image"] or ())
        if settings["pag_layers"] is not None:
            settings["pag_layers"] = tuple(settings["pag_layers"])
        if jobs and jobs[-1][0] == settings and len(jobs[-1][1]) < args.batch_size:
            jobs[-1][1].append(rec)
        else:
            jobs.append((settings, [rec]))
    return jobs


def check_plan(jobs: list[tuple[dict, list[dict]]], args: argparse.Namespace) -> None:
    """Everything that can be checked before a model is loaded: sizes, input images (readable), ControlNet
    flags that fit together, mask without image, strength without image, and model files (LoRAs first): each a
    file or folder that exists or a Hugging Face repo id, as `hub.resolve` takes them."""
    from . import hub

    n = len(args.controlnet or ())
    scales = args.control_scale or []
    if not n and (scales or (args.control_start, args.control_end) != (0.0, 1.0)):
        raise ValueError("--control_scale / --control_start / --control_end act on a ControlNet: add --controlnet")
    if len(scales) not in (0, 1, n):
        raise ValueError(f"--control_scale: {len(scales)} values for {n} --controlnet")
    if args.control_start > args.control_end:
        raise ValueError(f"--control_start {args.control_start:g} is after --control_end {args.control_end:g}")
    if args.strength is not None and not any(s["image"] for s, _ in jobs):
        raise ValueError("--strength needs --image (or records with an \"image\")")
    checked: set[str] = set()
    for settings, recs in jobs:
        where = f"prompt {recs[0]['name']!r}" if args.json_file else "--image/--mask"
        given = settings["control_image"]
        if len(given) != n:
            where_c = f"prompt {recs[0]['name']!r}" if any("control_image" in r for r in recs) else "--control_image"
            raise ValueError(f"{where_c}: {len(given)} control images for {n} --controlnet (one each)")
        if settings["mask"] and not settings["image"]:
            raise ValueError(f"{where}: --mask needs --image (the picture whose masked region is repainted)")
        for flag, path in [("image", settings["image"]), ("mask", settings["mask"]),
                           *[("control_image", p) for p in given]]:
            if path and path not in checked:
                check_image_file(path, flag)
                checked.add(path)
        for side in ("height", "width"):
            v = settings[side]
            if v is not None and not settings["resolution_binning"] and (v <= 0 or v % LATENT_FACTOR):
                f = LATENT_FACTOR
                lo, hi = max(f, v // f * f), (v // f + 1) * f
                where = f"prompt {recs[0]['name']!r}: " if side in recs[0] else ""
                raise ValueError(f"{where}--{side} {v} must be a positive multiple of {LATENT_FACTOR} (the DC-AE "
                                 f"compresses {LATENT_FACTOR}x; or --resolution_binning): use {lo} or {hi}")
    refs = [*[("lora", parse_lora(t)[0]) for t in args.lora or ()], *[("controlnet", c) for c in args.controlnet or ()],
            ("dit", args.dit), ("vae", args.vae), ("text_encoder", args.text_encoder), ("model", args.model)]
    for flag, ref in refs:
        if ref is not None and not Path(ref).expanduser().exists() and hub.repo_of(ref) is None:
            raise FileNotFoundError(f"--{flag} {ref}: no such file or folder, and not a Hugging Face repo id "
                                    "(owner/name)")


def check_image_file(path: str, flag: str) -> None:
    """An input image that exists and decodes (ValueError / FileNotFoundError naming the flag and file)."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"--{flag} {path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"--{flag} {path}: not a readable image ({e})") from None


def resolve_defaults(jobs: list[tuple[dict, list[dict]]], pipe: Any) -> None:
    """Fill each job's unset settings from the loaded model's spec (`pipe.spec`, read from its folder), so the
    PNG metadata holds the values used, and check what only the model can tell: PAG blocks within its depth; a
    negative prompt on Sana-Sprint (no CFG) is dropped with a warning (and not written to the PNG metadata as if
    it had acted); PAG blocks given without a PAG scale and a shift given to the scm sampler are named in
    warnings."""
    spec, depth = pipe.spec, pipe.dit.cfg.depth
    defaults = {"height": spec.size, "width": spec.size, "steps": spec.steps, "guidance_scale": spec.guidance_scale,
                "pag_layers": spec.pag_layers, "sampler": spec.sampler, "flow_shift": spec.shift,
                "truncate_timesteps": spec.truncate_timesteps}
    scm_times = {"max_timesteps": spec.max_timesteps, "intermediate_timesteps": spec.intermediate_timesteps}
    dropped = unused_pag = unused_shift = False
    for settings, recs in jobs:
        unused_pag |= settings["pag_layers"] is not None and settings["pag_scale"] == 0
        unused_shift |= settings["flow_shift"] is not None and (settings["sampler"] or spec.sampler) == "scm"
        for key, value in defaults.items():
            if settings[key] is None:
                settings[key] = value
        for key, value in scm_times.items():  # shown where they act; the pipeline warns about given ones that don't
            if settings[key] is None and settings["sampler"] == "scm":
                settings[key] = value
        if settings["pag_scale"] > 0 and max(settings["pag_layers"]) >= depth:
            raise ValueError(f"--pag_layers {' '.join(map(str, settings['pag_layers']))}: this model has {depth} "
                             f"blocks (0..{depth - 1})")
        if spec.sprint and settings["negative_prompt"]:
            settings["negative_prompt"], dropped = "", True
    if dropped:
        log.warning("--negative_prompt is not used: Sana-Sprint has no classifier-free guidance")
    if unused_pag:
        log.warning("--pag_layers is not used: PAG is off without --pag_scale > 0")
    if unused_shift:
        log.warning("--flow_shift is not used by the scm sampler: Sana-Sprint's times are --max_timesteps / "
                    "--intermediate_timesteps")


def parse_lora(text: str) -> tuple[str, float]:
    """"PATH[:SCALE]" -> (path, scale); a colon that starts no number belongs to the path."""
    path, _, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def device_for_rank(device: str | None) -> str | None:
    """--device, or under a launcher on a CUDA machine the GPU of this process's LOCAL_RANK."""
    if device is None and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device


def pipe_arguments(settings: dict[str, Any], control: dict[str, Any]) -> dict[str, Any]:
    """A job's settings as `SanaPipeline.__call__` arguments (input images as paths: the pipeline reads them at
    the job's size)."""
    kw = {BY_NAME[k].setting: v for k, v in settings.items() if BY_NAME[k].setting and v is not None}
    image, mask = settings["image"], settings["mask"]
    if image:
        kw |= {"image": image, "strength": settings["strength"], "mask_image": mask or None}
    if settings["control_image"]:
        given = settings["control_image"]
        kw |= {"control_image": list(given) if len(given) > 1 else given[0], **control}
    return kw


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if sum(v is not None for v in (args.prompt, args.txt_file, args.json_file)) > 1:
        parser.error("give one of --prompt, --txt_file, --json_file")
    if args.dtype == "auto":
        chosen = default_dtype(default_device(device_for_rank(args.device)))
        args.dtype = next(name for name, dtype in DTYPES.items() if dtype == chosen)
    from tqdm.auto import tqdm

    from .images import save_images
    from .pipeline import SanaPipeline
    from .previews import save_previews

    try:
        loras = [parse_lora(t) for t in args.lora or ()]
        if args.preview_decoder and not args.preview_every:
            raise ValueError("--preview_decoder decodes the --preview_every previews: add --preview_every N")
        records = read_prompts(args)
        images = plan_images(records, args)
        if not images:
            log.warning("nothing to make: %s", "every image is already in --output_dir" if args.skip_existing
                        else "--start_index/--end_index (or this process's share) select no prompt")
            return 0
        for im in images:  # image-to-image's default strength: 0.6, inpainting 1.0
            if im.get("image", args.image) and im.get("strength", args.strength) is None:
                im["strength"] = 1.0 if im.get("mask", args.mask) else 0.6
        jobs = plan_jobs(images, args)
        check_plan(jobs, args)
        pipe = SanaPipeline.from_pretrained(args.model, dit=args.dit, vae=args.vae, text_encoder=args.text_encoder,
                                            torch_dtype=DTYPES[args.dtype], device=device_for_rank(args.device),
                                            use_pe=args.use_pe, offload="blocks" if args.offload_blocks else args.offload,
                                            compile=args.compile or False,
                                            variant=args.variant, controlnet=args.controlnet or None)
        for path, scale in loras:
            pipe.load_lora(path, scale)
        if args.preview_decoder:
            pipe.load_preview_decoder(args.preview_decoder)
        resolve_defaults(jobs, pipe)
        scales = args.control_scale or []
        control = {"controlnet_conditioning_scale": scales[0] if len(scales) == 1 else scales or 1.0,
                   "control_guidance_start": args.control_start, "control_guidance_end": args.control_end}
        run = {"model": str(args.model), "dit": args.dit, "vae": args.vae, "text_encoder": args.text_encoder,
               "dtype": args.dtype, "lora": [f"{p}:{s:g}" for p, s in loras], "model_variant": pipe.dit.variant}
        if args.controlnet:
            run |= {"controlnet": args.controlnet, "control_scale": scales or [1.0],
                    "control_start": args.control_start, "control_end": args.control_end}
        for settings, recs in tqdm(jobs, desc="batches", disable=not args.progress or len(jobs) <= 1):
            watch = {"preview_every": args.preview_every, "callback": save_previews(
                Path(args.output_dir) / "previews", [r["name"] for r in recs])} if args.preview_every else {}
            out = pipe([r["prompt"] for r in recs], seed=[r["seed"] for r in recs], progress=args.progress,
                       **pipe_arguments(settings, control), **watch)
            shown = {k: v for k, v in settings.items() if v not in (None, ())}
            metas = [{"prompt": r["prompt"], "seed": r["seed"], **shown, **run} for r in recs]
            for path in save_images(out, args.output_dir, metas, [r["name"] for r in recs]):
                print(path)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
