"""Training data: image + caption folders, the bad-data report, aspect-ratio buckets, the feature cache.

A folder holds `AAA.png` (or .jpg/.jpeg/.webp) with `AAA.txt` beside it, whose first line is the caption
(NVlabs' `SanaImgDataset`); an optional `meta_data.json` with `"img_names": [...]` lists the images to use
(names relative to the folder). Each image is resized to cover its bucket and centre-cropped to it
(`resolutions.resize_and_crop`), then encoded once by the DC-AE (scaled latents) and its caption once by
Gemma-2 with the complex human instruction (`SanaTextEncoder.encode`); both go to a cache on disk keyed by the
file's content hash, the encoder's identity (a fingerprint of its weights) and the bucket, and are reused by
later runs. Training then reads the cache and holds only the DiT.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..resolutions import bin_size, buckets, resize_and_crop, snap

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CACHE_VERSION = 2  # bump when what a cache file holds changes (2: transparency composited on white)


@dataclass(frozen=True)
class Sample:
    image: Path
    caption: str


@dataclass
class Scan:
    """What a scan found: usable samples and the problems, one line per bad file ("path: why")."""

    samples: list[Sample]
    bad: list[str]


def _caption(image: Path) -> str:
    """The first line of the same-name .txt, stripped; ValueError saying why there is none (no such file, empty,
    not UTF-8: never decoded with replacement characters)."""
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        raise ValueError(f"no caption (expected the first line of {txt.name})")
    try:
        lines = txt.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"its caption {txt.name} is not UTF-8 text ({e})") from None
    if not lines or not lines[0].strip():
        raise ValueError(f"empty caption (the first line of {txt.name})")
    return lines[0].strip()


def _listed(folder: Path) -> tuple[list[Path], list[str]]:
    """The images of a folder: those `meta_data.json` lists, else every image file below it (sorted; hidden
    folders skipped). Returns (images, problems)."""
    meta = folder / "meta_data.json"
    if meta.is_file():
        try:
            names = json.loads(meta.read_text(encoding="utf-8"))["img_names"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{meta}: expected JSON with an \"img_names\" list ({type(e).__name__}: {e})") from e
        images, bad = [], []
        for name in names:
            path = folder / name
            found = path if path.suffix else next((path.with_suffix(s) for s in IMAGE_SUFFIXES
                                                   if path.with_suffix(s).is_file()), path)
            if found.is_file():
                images.append(found)
            else:
                bad.append(f"{path}: listed in {meta.name} but missing")
        return images, bad
    images = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
              and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return images, []


def scan(folders: Sequence[str | Path], min_size: int = 0) -> Scan:
    """Find the (image, caption) pairs of `folders`. Bad data (a missing or empty caption, an image that cannot
    be decoded, one whose shorter side is under `min_size` px) is collected in `Scan.bad`, not raised.
    FileNotFoundError for a folder that does not exist; ValueError naming a folder with no image at all."""
    from PIL import Image

    samples, bad, transparent = [], [], []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"--data_dir {folder}: no such folder")
        images, problems = _listed(folder)
        if not images:
            raise ValueError(f"--data_dir {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        bad += problems
        for image in images:
            try:
                caption = _caption(image)
            except ValueError as e:
                bad.append(f"{image}: {e}")
                continue
            try:
                with Image.open(image) as im:
                    im.load()
                    size = im.size
                    if has_alpha(im):
                        transparent.append(str(image))
            except Exception as e:  # PIL raises many kinds for broken files
                bad.append(f"{image}: cannot be read as an image ({type(e).__name__}: {e})")
                continue
            if min(size) < min_size:
                bad.append(f"{image}: too small ({size[0]}x{size[1]} px, at least {min_size} px a side needed)")
                continue
            samples.append(Sample(image, caption))
    if transparent:
        log.warning("%d images have transparency; their transparent parts are trained as white (composited on "
                    "white): %s", len(transparent), ", ".join(transparent[:5]) + (", ..." if len(transparent) > 5
                                                                                  else ""))
    return Scan(samples, bad)


def has_alpha(im) -> bool:
    """Whether a PIL image has transparency (an alpha band, or a palette/colour key marked transparent)."""
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def to_rgb(im):
    """A PIL image as RGB; transparency composited on white (not dropped, which leaves whatever colour the
    transparent pixels hold, often black)."""
    from PIL import Image

    if not has_alpha(im):
        return im.convert("RGB")
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def bucket_sizes(resolution: int, multi_scale: bool) -> list[tuple[int, int]]:
    """The (height, width) px sizes images are trained at: resolution x resolution, or with `multi_scale` NVlabs'
    aspect-ratio buckets at that base (`resolutions.buckets`), each snapped to a multiple of 32 below 512 px."""
    if resolution <= 0 or resolution % 32:
        raise ValueError(f"--resolution {resolution} must be a positive multiple of 32 (the DC-AE compresses 32x)")
    if not multi_scale:
        return [(resolution, resolution)]
    return sorted({(snap(h), snap(w)) for h, w in buckets(resolution).values()})


def bucket_of(size: tuple[int, int], resolution: int, multi_scale: bool) -> tuple[int, int]:
    """The (height, width) bucket of an image of `size` = (width, height) px (PIL's order)."""
    if not multi_scale:
        return resolution, resolution
    h, w = bin_size(size[1], size[0], resolution)
    return snap(h), snap(w)


def load_image(path: Path, height: int, width: int) -> torch.Tensor:
    """An image as (3, height, width) float32 in [-1, 1]: RGB, resized to cover the size and centre-cropped.
    Large downscales are first reduced by an integer factor with a box filter (PIL's `reduce`), so the bilinear
    resize that follows does not alias."""
    from PIL import Image

    with Image.open(path) as im:
        im = to_rgb(im)
        factor = int(min(im.width / width, im.height / height))
        if factor >= 2:
            im = im.reduce(factor)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
    return resize_and_crop(x[None], height, width)[0].contiguous()


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(module: torch.nn.Module, extra: str = "") -> str:
    """An identity for an encoder's weights (hex): every parameter's name, shape, dtype, sum and a strided sample
    of its values, plus `extra` (settings that change the output). Fast even for Gemma-2-2B."""
    h = hashlib.sha256(extra.encode())
    for name, p in module.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}{float(flat.float().sum()):.6e}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, (CACHE_VERSION, *parts))).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Record:
    """One cached training example: its latent file, caption-embedding file and bucket (height, width) px."""

    latent: Path
    text: Path
    bucket: tuple[int, int]


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a cache file atomically (a half-written file never looks complete)."""
    from .export import write_safetensors

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write_safetensors({k: v.contiguous() for k, v in tensors.items()}, tmp)
    tmp.replace(path)


def text_path(cache_dir: Path, caption: str, text_id: str, use_chi: bool = True) -> Path:
    """The cache file of a caption's embedding (with or without the complex human instruction)."""
    return cache_dir / "text" / f"{_key(caption, text_id, use_chi)}.safetensors"


def plan_cache(samples: Sequence[Sample], cache_dir: Path, vae_id: str, text_id: str, resolution: int,
               multi_scale: bool) -> list[Record]:
    """Where each sample's features live in the cache (they may not exist yet)."""
    from PIL import Image

    records = []
    for s in samples:
        with Image.open(s.image) as im:
            bucket = bucket_of(im.size, resolution, multi_scale)
        records.append(Record(cache_dir / "latents" / f"{_key(file_hash(s.image), vae_id, *bucket)}.safetensors",
                              text_path(cache_dir, s.caption, text_id), bucket))
    return records


@torch.no_grad()
def cache_latents(samples: Sequence[Sample], records: Sequence[Record], vae: torch.nn.Module, device: torch.device,
                  batch_size: int = 4, progress: bool = True) -> int:
    """Encode the images whose latent is not cached yet: (32, h/32, w/32) float32 in the DiT's (scaled) space.
    Returns how many were encoded."""
    from tqdm.auto import tqdm

    from ..dcae import run_finite

    todo = [(s, r) for s, r in zip(samples, records) if not r.latent.is_file()]
    by_bucket: dict[tuple[int, int], list] = {}
    for s, r in todo:
        by_bucket.setdefault(r.bucket, []).append((s, r))
    with tqdm(total=len(todo), desc="caching latents", disable=not progress or not todo) as bar:
        for (h, w), items in by_bucket.items():
            for i in range(0, len(items), batch_size):
                chunk = items[i:i + batch_size]
                pixels = torch.stack([load_image(s.image, h, w) for s, _ in chunk]).to(device)
                latents = vae.scale(run_finite(vae, "encode", pixels).float()).cpu()
                for (_, r), z in zip(chunk, latents):
                    _save({"latent": z}, r.latent)
                bar.update(len(chunk))
    return len(todo)


@torch.no_grad()
def cache_text(captions: dict[Path, str], text_encoder: torch.nn.Module, use_chi: bool = True,
               max_length: int = 300, batch_size: int = 8, progress: bool = True) -> int:
    """Encode the captions {cache file: text} whose file does not exist yet (`use_chi`: with the complex human
    instruction; `max_length` tokens). Stored: the rows up to the last real token (later rows are zeros) and the
    (max_length,) mask. Returns how many were encoded."""
    from tqdm.auto import tqdm

    items = [(path, text) for path, text in captions.items() if not path.is_file()]
    for i in tqdm(range(0, len(items), batch_size), desc="caching captions", disable=not progress or not items):
        chunk = items[i:i + batch_size]
        embeds, mask = text_encoder.encode([c for _, c in chunk], use_chi=use_chi, max_length=max_length)
        for (path, _), e, m in zip(chunk, embeds.cpu(), mask.cpu()):
            _save({"embeds": e[: int(m.nonzero().max()) + 1], "mask": m.to(torch.uint8)}, path)
    return len(items)


def read_text(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A cached caption: embeddings (T, D) with zero rows restored, mask (T,) int64."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    mask = t["mask"].long()
    embeds = t["embeds"].new_zeros(mask.shape[0], t["embeds"].shape[1])
    embeds[: t["embeds"].shape[0]] = t["embeds"]
    return embeds, mask


def read_latent(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["latent"]


def load_batch(records: Sequence[Record]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents (B, 32, h, w) float32, caption embeddings (B, T, D), masks (B, T)) of records of one bucket."""
    texts = [read_text(r.text) for r in records]
    return (torch.stack([read_latent(r.latent) for r in records]), torch.stack([e for e, _ in texts]),
            torch.stack([m for _, m in texts]))


def epoch_batches(buckets_of: Sequence[tuple[int, int]], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's global batches of sample indices: shuffled by (seed, epoch), each from one bucket, the
    remainder of each bucket dropped (NVlabs' `drop_last`). The same for any number of processes."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    groups: dict[tuple[int, int], list[int]] = {}
    for i in torch.randperm(len(buckets_of), generator=g).tolist():
        groups.setdefault(buckets_of[i], []).append(i)
    batches = [grp[k:k + global_batch] for _, grp in sorted(groups.items())
               for k in range(0, len(grp) - global_batch + 1, global_batch)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


def micro_batches(batch: list[int], accumulation: int, world: int, rank: int) -> Iterator[tuple[int, list[int]]]:
    """This process's part of a global batch for each accumulation step: (first position in the global batch,
    indices). Micro-step m of process r takes positions [(m * world + r) * b, ... + b), b the per-process batch."""
    b = len(batch) // (accumulation * world)
    for m in range(accumulation):
        start = (m * world + rank) * b
        yield start, batch[start:start + b]
