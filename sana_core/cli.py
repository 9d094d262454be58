"""`python -m sana_core.cli`: text-to-image from the command line (the job of NVlabs' `scripts/inference.py`).

    python -m sana_core.cli --prompt "a cyberpunk cat" --output_dir output
    python -m sana_core.cli --txt_file prompts.txt --model ./Sana_600M_1024px_diffusers
    python -m sana_core.cli --json_file prompts.json --dit Sana_1600M_1024px.pth --vae dc-ae --text_encoder gemma
    python -m sana_core.cli --prompt "a red fox" --image photo.png --mask mask.png   # inpainting (white = repaint)
    python -m sana_core.cli --prompt "a castle" --controlnet Efficient-Large-Model/Sana_600M_1024px_ControlNet_HED \
        --dit Efficient-Large-Model/Sana_600M_1024px_ControlNet_HED --control_image scribble.png

A txt file holds one prompt a line (blank lines and lines starting with # are skipped). A json file holds a
list of prompts or records, or an object mapping names to prompts or records; a record has "prompt" and may
override "negative_prompt", "seed", "height", "width", "steps", "guidance_scale", "pag_guidance_scale", and
"image", "mask", "control_image" (a path, or a list with one per ControlNet; relative paths are looked up next to
the json file when they are not found from the working folder).
Every PNG carries its prompt and settings in its metadata.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RECORD_FIELDS = {"prompt", "name", "negative_prompt", "seed", "height", "width", "steps", "guidance_scale",
                 "pag_guidance_scale", "image", "mask", "control_image"}
PATH_FIELDS = ("image", "mask", "control_image")  # record fields naming files
#: plan_jobs' settings that GenerationSettings checks before any model is loaded
GENERATION_FIELDS = {"negative_prompt", "height", "width", "num_inference_steps", "guidance_scale",
                     "pag_guidance_scale", "pag_layers", "sampler", "shift", "use_chi"}


def read_prompts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The prompt records the arguments ask for, each at least {"prompt": ...}."""
    if args.txt_file:
        path = Path(args.txt_file)
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        records = [{"prompt": ln} for ln in lines if ln and not ln.startswith("#")]
    elif args.json_file:
        path = Path(args.json_file)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        items = list(data.items()) if isinstance(data, dict) else list(enumerate(data))
        records = []
        for key, item in items:
            rec = {"prompt": item} if isinstance(item, str) else item
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise ValueError(f"{path}: entry {key!r} must be a prompt string or an object with a \"prompt\" string")
            unknown = set(rec) - RECORD_FIELDS
            if unknown:
                raise ValueError(f"{path}: entry {key!r} has unknown fields {sorted(unknown)}; valid: {sorted(RECORD_FIELDS)}")
            if isinstance(data, dict):
                rec = {"name": str(key), **rec}
            for field in PATH_FIELDS:
                if field in rec:
                    rec[field] = _record_paths(rec[field], path, key, field)
            records.append(rec)
    else:
        return [{"prompt": args.prompt}]
    if not records:
        raise ValueError(f"{path}: holds no prompts")
    return records


def _record_paths(value: Any, json_path: Path, key: Any, field: str) -> str | tuple[str, ...]:
    """A record's file path(s), each existing as given or next to the json file."""
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if not isinstance(v, str):
            raise ValueError(f"{json_path}: entry {key!r}: \"{field}\" must be a file path (or a list of them)")
        found = Path(v) if Path(v).exists() else json_path.parent / v
        if not found.exists():
            raise FileNotFoundError(f"{json_path}: entry {key!r}: {field} {v!r} not found (nor next to the json file)")
        out.append(str(found))
    return tuple(out) if isinstance(value, list) else out[0]


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import COMPILE_MODES, DEFAULT_MODEL
    from .samplers import SAMPLERS, SCM_INTERMEDIATE_TIMESTEPS, SCM_MAX_TIMESTEPS

    p = argparse.ArgumentParser(prog="python -m sana_core.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default='a cyberpunk cat with a neon sign that says "Sana"')
    src.add_argument("--txt_file", help="one prompt a line")
    src.add_argument("--json_file", help="prompt records (see above)")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="diffusers Sana folder, Hugging Face repo id or hf:// URL (default: %(default)s)")
    p.add_argument("--dit", help="DiT checkpoint instead of the model's (NVlabs .pth, safetensors, folder, hf://)")
    p.add_argument("--vae", help="DC-AE file or folder instead of the model's")
    p.add_argument("--text_encoder", help="Gemma-2 folder or single file instead of the model's")
    p.add_argument("--output_dir", default="output")
    p.add_argument("--height", type=int, default=1024, help="pixels, a multiple of 32")
    p.add_argument("--width", type=int, default=1024, help="pixels, a multiple of 32")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; 2 for Sprint)")
    p.add_argument("--guidance_scale", type=float, default=4.5, help="CFG scale (Sprint: embedded guidance)")
    p.add_argument("--pag_guidance_scale", type=float, default=0.0, help="PAG scale; 0 turns PAG off")
    p.add_argument("--pag_layers", type=int, nargs="+", default=[8], help="blocks whose self-attention PAG perturbs")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; the next ones count up")
    p.add_argument("--sampler", choices=list(SAMPLERS), help="default: flow_dpmpp_2m, or scm for Sprint models")
    p.add_argument("--shift", type=float, help="timestep shift (default 3.0; 6.0 from 4K up)")
    p.add_argument("--batch_size", type=int, default=1, help="prompts generated together")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--device", help="cuda, cuda:1, cpu, mps (default: cuda if available)")
    p.add_argument("--offload", action="store_true", help="keep idle models on the CPU (small GPUs)")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, default=None,
                   help="torch.compile the DiT, optionally naming the mode (reduce-overhead: CUDA graphs); pays "
                        "off over many images: the first one includes compiling")
    p.add_argument("--tiled_decode", action=argparse.BooleanOptionalAction, default=None,
                   help="force (or forbid) tiled DC-AE decoding; default decides from free memory")
    p.add_argument("--no_chi", action="store_true", help="encode prompts without the complex human instruction")
    p.add_argument("--use_pe", action=argparse.BooleanOptionalAction, default=None,
                   help="force the 2K/4K sin-cos positional embedding on/off (default: detected)")
    p.add_argument("--image", help="image-to-image / inpainting: the picture to start from (resized and centre-"
                                   "cropped to --width x --height)")
    p.add_argument("--mask", help="inpainting: white (or transparent) = repaint, black = keep; needs --image")
    p.add_argument("--strength", type=float, default=None,
                   help="how much of the schedule runs on --image (0-1; default 0.6 for image-to-image, 1.0 when "
                        "inpainting)")
    p.add_argument("--num_images_per_prompt", type=int, default=1, help="images of each prompt (seeds count up)")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="a Sana ControlNet (NVlabs .pth or repo id, which may also be --dit; diffusers folder); repeat "
                        "for several")
    p.add_argument("--control_image", action="append", default=[], metavar="PATH",
                   help="the control image of each --controlnet, in order (HED: white scribbles on black; any size, "
                        "resized and centre-cropped)")
    p.add_argument("--control_scale", type=float, action="append", default=[], metavar="SCALE",
                   help="ControlNet strength: one for all or one per --controlnet (default 1)")
    p.add_argument("--control_start", type=float, default=0.0, help="fraction of the steps before the ControlNets act")
    p.add_argument("--control_end", type=float, default=1.0, help="fraction of the steps after which they stop")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="merge a Sana LoRA into the DiT (repeat for several; scale default 1)")
    p.add_argument("--variant", help="weight files to download from a hub repo: fp16, bf16, or 'none' for the full "
                                     "precision files (default: from --dtype)")
    p.add_argument("--truncate_timesteps", action=argparse.BooleanOptionalAction, default=True,
                   help="feed the DiT int(1000 sigma) as NVlabs and diffusers' DPM-Solver do; --no-truncate_timesteps "
                        "with --sampler flow_euler matches diffusers' FlowMatchEulerDiscreteScheduler")
    p.add_argument("--max_timesteps", type=float, default=SCM_MAX_TIMESTEPS, help="Sana-Sprint: the first SCM time")
    p.add_argument("--intermediate_timesteps", type=float, default=SCM_INTERMEDIATE_TIMESTEPS,
                   help="Sana-Sprint: the middle SCM time of a 2-step run")
    p.add_argument("--max_sequence_length", type=int, default=300, help="caption tokens")
    p.add_argument("--complex_human_instruction", help="replace Sana's complex human instruction with this text")
    p.add_argument("--resolution_binning", action="store_true",
                   help="any --height/--width: generate at the model's nearest training bucket and resize + crop "
                        "to the size asked (diffusers' use_resolution_binning)")
    p.add_argument("--start_index", type=int, default=None, help="first prompt of the file to make (0-based)")
    p.add_argument("--end_index", type=int, default=None, help="stop before this prompt")
    p.add_argument("--skip_existing", action="store_true",
                   help="leave out images whose PNG is already in --output_dir (resume an interrupted run)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def plan_images(records: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One entry per image this process makes, each with its name and seed.

    `--start_index`/`--end_index` slice the prompts (NVlabs' flags); each prompt makes `--num_images_per_prompt`
    images; image j of the whole file is named after its prompt (`NNNNN` or the record's name, `_k` for copies)
    and seeded `--seed + j` unless its record sets a seed (then seed + k). Under torchrun / accelerate
    (`RANK`, `WORLD_SIZE`) each process takes every WORLD_SIZE-th image; with `--skip_existing` images already
    in the output folder are left out. So an image never depends on its batch, its process or the slice.
    """
    n = args.num_images_per_prompt
    images = []
    for i, rec in list(enumerate(records))[args.start_index:args.end_index]:
        for k in range(n):
            name = rec.get("name", f"{i:05d}")
            seed = rec["seed"] + k if "seed" in rec else args.seed + i * n + k
            images.append({**rec, "name": name if n == 1 else f"{name}_{k}", "seed": seed})
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    images = images[rank::world]
    if args.skip_existing:
        images = [im for im in images if not (Path(args.output_dir) / f"{im['name']}.png").exists()]
    return images


def plan_jobs(images: list[dict[str, Any]], args: argparse.Namespace, sprint: bool) -> list[tuple[dict, list[dict]]]:
    """Group images into batches of up to `--batch_size` that share every setting but the prompt and seed."""
    jobs: list[tuple[dict, list[dict]]] = []
    for rec in images:
        settings = dict(
            negative_prompt=rec.get("negative_prompt", args.negative_prompt),
            height=rec.get("height", args.height), width=rec.get("width", args.width),
            num_inference_steps=rec.get("steps", args.steps or (2 if sprint else 20)),
            guidance_scale=rec.get("guidance_scale", args.guidance_scale),
            pag_guidance_scale=rec.get("pag_guidance_scale", args.pag_guidance_scale),
            pag_layers=tuple(args.pag_layers), sampler=args.sampler or ("scm" if sprint else "flow_dpmpp_2m"),
            shift=args.shift, use_chi=not args.no_chi, truncate_timesteps=args.truncate_timesteps,
            max_timesteps=args.max_timesteps, intermediate_timesteps=args.intermediate_timesteps,
            max_sequence_length=args.max_sequence_length, complex_human_instruction=args.complex_human_instruction,
            use_resolution_binning=args.resolution_binning,
            image=rec.get("image", args.image), mask=rec.get("mask", args.mask),
            control_image=_as_tuple(rec.get("control_image", tuple(args.control_image))))
        if jobs and jobs[-1][0] == settings and len(jobs[-1][1]) < args.batch_size:
            jobs[-1][1].append(rec)
        else:
            jobs.append((settings, [rec]))
    return jobs


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def check_controls(jobs: list[tuple[dict, list[dict]]], args: argparse.Namespace) -> None:
    """ControlNet flags that fit together, before any model is loaded."""
    n = len(args.controlnet)
    if not n and (args.control_scale or (args.control_start, args.control_end) != (0.0, 1.0)):
        raise ValueError("--control_scale / --control_start / --control_end act on a ControlNet: add --controlnet")
    if len(args.control_scale) not in (0, 1, n):
        raise ValueError(f"--control_scale: {len(args.control_scale)} values for {n} --controlnet")
    if not 0 <= args.control_start <= args.control_end <= 1:
        raise ValueError("--control_start and --control_end must satisfy 0 <= start <= end <= 1")
    for settings, recs in jobs:
        given = settings["control_image"]
        if len(given) != n:
            where = f"prompt {recs[0]['name']!r}" if any("control_image" in r for r in recs) else "--control_image"
            raise ValueError(f"{where}: {len(given)} control images for {n} --controlnet (one each)")
        for path in given:
            if not Path(path).is_file():
                raise FileNotFoundError(f"control image {path}: no such file")
        if settings["mask"] and not settings["image"]:
            raise ValueError(f"prompt {recs[0]['name']!r}: a mask needs an image (the picture whose masked region "
                             "is repainted)")


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tqdm.auto import tqdm

    from .pipeline import GenerationSettings, SanaPipeline, load_image, save_images

    try:
        if args.mask and not args.image:
            raise ValueError("--mask needs --image (the picture whose masked region is repainted)")
        if args.strength is not None and not 0 < args.strength <= 1:
            raise ValueError("--strength must be in (0, 1]")
        if args.num_images_per_prompt < 1 or args.batch_size < 1:
            raise ValueError("--num_images_per_prompt and --batch_size must be at least 1")
        loras = [parse_lora(text) for text in args.lora]
        records = read_prompts(args)
        images = plan_images(records, args)
        if not images:
            logging.getLogger(__name__).warning(
                "nothing to make: %s", "every image is already in --output_dir" if args.skip_existing
                else "--start_index/--end_index (or this process's share) select no prompt")
            return 0
        planned = plan_jobs(images, args, sprint=False)
        check_controls(planned, args)
        if args.strength is not None and not any(settings["image"] for settings, _ in planned):
            raise ValueError("--strength needs --image (or records with an \"image\")")
        for settings, _ in planned:  # fail on bad sizes before loading anything
            if not args.resolution_binning:
                GenerationSettings("", **{k: v for k, v in settings.items() if k in GENERATION_FIELDS}).validate()
        pipe = SanaPipeline.from_pretrained(args.model, dit=args.dit, vae=args.vae, text_encoder=args.text_encoder,
                                            dtype=DTYPES[args.dtype], device=device_for_rank(args.device),
                                            use_pe=args.use_pe, offload=args.offload, compile=args.compile or False,
                                            variant=args.variant, controlnet=args.controlnet or None)
        for path, scale in loras:
            pipe.load_lora(path, scale)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = plan_jobs(images, args, sprint=pipe.dit.cfg.guidance_embed)
    model = str(args.dit or args.model)
    for settings, recs in tqdm(jobs, desc="batches", disable=args.no_progress or len(jobs) <= 1):
        settings = dict(settings)
        image, mask, control = settings.pop("image"), settings.pop("mask"), settings.pop("control_image")
        extra: dict[str, Any] = {}
        if image:
            size = (settings["width"], settings["height"])
            extra = {"image": load_image(image, *size), "strength": args.strength or (1.0 if mask else 0.6),
                     "mask_image": load_image(mask, *size, mask=True) if mask else None}
        if control:
            extra |= {"control_image": list(control) if len(control) > 1 else control[0],
                      "controlnet_conditioning_scale": args.control_scale[0] if len(args.control_scale) == 1
                      else args.control_scale or 1.0,
                      "control_guidance_start": args.control_start, "control_guidance_end": args.control_end}
        images = pipe([r["prompt"] for r in recs], seed=[r["seed"] for r in recs], progress=not args.no_progress,
                      tiled_decode=args.tiled_decode, **settings, **extra)
        shown = {"image": image, "mask": mask, "strength": extra["strength"]} if image else {}
        if control:
            shown |= {"controlnet": args.controlnet, "control_image": list(control),
                      "control_scale": args.control_scale or [1.0], "control_start": args.control_start,
                      "control_end": args.control_end}
        metas = [{**settings, "prompt": r["prompt"], "seed": r["seed"], "model": model, "variant": pipe.dit.variant,
                  "loras": [f"{p}:{s:g}" for p, s in loras], **shown} for r in recs]
        for path in save_images(images, args.output_dir, metas, [r["name"] for r in recs]):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
