"""The training loop: Hugging Face accelerate (one process, DDP over GPUs/nodes, or FSDP by DiT block), the
recipe of `recipe.py` on features cached by `data.py`, checkpoints and resume, EMA, validation grids.

Batches and randomness do not depend on the number of processes: the data order is a function of (seed, epoch)
(`data.epoch_batches`); a global batch of `batch_size x gradient_accumulation_steps x processes` images is split
so that micro-step m of process r takes its slice (`data.micro_batches`); each sample's timestep, noise and caption
dropout come from a generator seeded by (seed, step, its position in the global batch). DDP averages the
gradients of equal-sized slices, so N processes reach the weights one process reaches with the same global batch.
The learning rate is used as given (`--scale_lr sqrt|linear` applies NVlabs' rule on the global batch / 256).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import hub
from ..checkpoints.dcae import load_dcae
from ..checkpoints.dit import load_dit
from ..checkpoints.files import read_state_dict
from ..checkpoints.gemma import load_text_encoder
from ..dit import SanaBlock, SanaDiT
from ..precision import DTYPES
from ..spec import SANA, model_spec
from . import data
from .config import TrainConfig, dump
from .export import normal_mode, save_full, write_safetensors
from .lora import add_lora, save_lora
from .recipe import drop_captions, flow_loss, sample_u, sigmas_from_u

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -r requirements-train.txt"


def require(module: str) -> Any:
    """Import an optional training dependency, or raise ImportError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"training needs the package of '{module}': {INSTALL_HINT}") from e


# ------------------------------------------------------------------------------------------------ model files


def feature_cache_dir(cfg: TrainConfig) -> Path:
    """Where the feature cache lives: --cache_dir, else $XDG_CACHE_HOME (or ~/.cache)/sana_core/train_features."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sana_core" / "train_features"


def clear_feature_cache(cfg: TrainConfig) -> Path:
    """Delete the feature cache folder (--clear_cache); returns it."""
    import shutil

    folder = feature_cache_dir(cfg)
    if folder.is_dir():
        shutil.rmtree(folder)
    log.info("feature cache %s cleared", folder)
    return folder


def model_parts(cfg: TrainConfig) -> tuple[Path, Path, Path]:
    """(DiT, DC-AE, Gemma-2) paths: the model folder's parts unless given; a single DiT file takes the default
    DC-AE and Gemma-2 of `pipeline` (as `SanaPipeline.from_pretrained`). Hub ids are fetched in full precision."""
    from ..pipeline import DEFAULT_TEXT_ENCODER, DEFAULT_VAE

    need = ["transformer", "scheduler"] + [part for part, given in (("vae", cfg.vae),
                                                                   ("text_encoder", cfg.text_encoder)) if not given]
    root = hub.resolve(cfg.model, need, None)
    single = root.is_file()
    vae = hub.resolve(cfg.vae or (DEFAULT_VAE if single else root))
    te = hub.resolve(cfg.text_encoder or (DEFAULT_TEXT_ENCODER if single else root))
    return root, vae, te


def null_caption(dit_path: Path) -> torch.Tensor | None:
    """NVlabs' learned null caption `y_embedder.y_embedding` (T, 2304) if the DiT file holds one (diffusers
    files do not), else None."""
    if not dit_path.is_file():
        return None
    sd = read_state_dict(dit_path, torch.float32, keep=lambda k: k.endswith("y_embedder.y_embedding"))
    return next(iter(sd.values()), None)


def _stat_key(path: Path) -> str:
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
    return "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def encoder_identity(path: Path, load: Callable[[], torch.nn.Module], cache_dir: Path,
                     extra: str = "") -> tuple[str, torch.nn.Module | None]:
    """(fingerprint of an encoder's weights + `extra`, the model if it had to be loaded to compute it). Known
    fingerprints are remembered per file (path, size, mtime) in the cache, so a warm cache loads no encoder."""
    index = cache_dir / "identities.json"
    known = json.loads(index.read_text()) if index.is_file() else {}
    key = f"{_stat_key(path)}#{extra}"
    if key in known:
        return known[key], None
    model = load()
    known[key] = data.fingerprint(model, extra)
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_name(f"{index.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=1))
    tmp.replace(index)
    return known[key], model


# ------------------------------------------------------------------------------------------------ helpers


def checkpoint_blocks(dit: SanaDiT) -> None:
    """Gradient checkpointing: each block's activations are recomputed in the backward pass (the module and its
    parameter names are unchanged)."""
    from torch.utils.checkpoint import checkpoint

    def run(forward: Callable, *args: Any) -> torch.Tensor:
        return checkpoint(forward, *args, use_reentrant=False)

    for block in dit.blocks:
        block.forward = functools.partial(run, block.forward)


def sample_seed(seed: int, step: int, position: int) -> int:
    """The seed of one sample's randomness at optimizer step `step`, position `position` of the global batch."""
    return int(np.random.SeedSequence([seed, step, position]).generate_state(1)[0])


def sample_randomness(cfg: TrainConfig, step: int, position: int, shape: tuple[int, ...], shift: float
                      ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(sigma (1,), noise (1, *shape), caption dropped?) of one sample, from its own generator."""
    g = torch.Generator().manual_seed(sample_seed(cfg.seed, step, position))
    u = sample_u(cfg.weighting_scheme, 1, g, cfg.logit_mean, cfg.logit_std, cfg.mode_scale)
    noise = torch.randn((1, *shape), generator=g)
    drop = bool(torch.rand(1, generator=g) < cfg.caption_dropout)
    return sigmas_from_u(u, shift), noise, drop


class EMA:
    """Exponential moving average (float32) of the trainable parameters: p_ema <- rate p_ema + (1 - rate) p."""

    def __init__(self, params: dict[str, torch.Tensor], rate: float):
        self.rate = rate
        self.shadow = {k: v.detach().float().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - self.rate)

    @contextlib.contextmanager
    def applied(self, params: dict[str, torch.Tensor]):
        """The EMA weights in the model for the duration (e.g. to save them), the trained ones after."""
        saved = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved[k])

    def state_dict(self) -> dict:
        return {"rate": self.rate, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.rate, self.shadow = state["rate"], {k: v.float() for k, v in state["shadow"].items()}


@dataclass
class Progress:
    """Where training is: optimizer steps done, epoch, next global batch of the epoch (checkpointed)."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    global_batch: int = 0
    mode: str = ""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def image_grid(images: torch.Tensor, columns: int = 4):
    """(N, 3, H, W) in [0, 1] -> one PIL image, `columns` images a row."""
    from PIL import Image

    n, _, h, w = images.shape
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    grid = torch.ones(3, rows * h, cols * w)
    for i, im in enumerate(images):
        grid[:, (i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    return Image.fromarray((grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


@torch.no_grad()
def sample_latents(dit: SanaDiT, embeds: torch.Tensor, mask: torch.Tensor, neg_embeds: torch.Tensor,
                   neg_mask: torch.Tensor, height: int, width: int, steps: int = SANA.steps,
                   guidance_scale: float = SANA.guidance_scale, shift: float = SANA.shift,
                   seed: int = 0) -> torch.Tensor:
    """Latents (B, 32, height/32, width/32) sampled by Flow-DPM-Solver with CFG for caption embeddings
    (B, T, D) / masks (B, T) and one negative (T, D) / (T,), image i from seed + i (as the CLI)."""
    from ..denoiser import SanaDenoiser, TextCondition, sample
    from ..samplers import randn

    device = next(dit.parameters()).device
    B = embeds.shape[0]
    cond = TextCondition(embeds.to(device), mask.to(device))
    uncond = TextCondition(neg_embeds[None].expand(B, -1, -1).to(device), neg_mask[None].expand(B, -1).to(device))
    noise = randn((B, dit.cfg.in_channels, height // 32, width // 32),
                  [torch.Generator().manual_seed(seed + i) for i in range(B)])
    denoiser = SanaDenoiser(dit, cond, uncond, guidance_scale, 0.0)
    return sample(denoiser, noise.to(device), "flow_dpmpp_2m", steps, shift, progress=False)


# ------------------------------------------------------------------------------------------------ training


class Trainer:
    """One training run; `run()` trains and returns the paths written. See the module docstring."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        accelerate = require("accelerate")
        logging.getLogger("accelerate").setLevel(logging.INFO if cfg.verbose else logging.WARNING)
        self.out = Path(cfg.output_dir)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is available here (--device cpu or auto)")
        cpu = cfg.device == "cpu"
        precision = cfg.dtype
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() and not cpu and torch.cuda.is_bf16_supported() else "fp32"
        kwargs: dict[str, Any] = {}
        if cfg.fsdp:
            kwargs["fsdp_plugin"] = accelerate.FullyShardedDataParallelPlugin(
                sharding_strategy="FULL_SHARD", auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=[SanaBlock.__name__], state_dict_type="FULL_STATE_DICT",
                use_orig_params=True)
        self.accelerator = accelerate.Accelerator(mixed_precision="no" if precision == "fp32" else precision,
                                                  cpu=cpu, **kwargs)
        if cfg.fsdp and self.accelerator.distributed_type != accelerate.DistributedType.FSDP:
            raise ValueError(f"--fsdp: accelerate shards with FSDP only over several GPU (accelerator) processes; this "
                             f"run is {self.accelerator.distributed_type.value} with {self.accelerator.num_processes} "
                             "process(es): drop --fsdp (DDP) or launch on GPUs")
        self.device = self.accelerator.device
        self.cache_dir = feature_cache_dir(cfg)
        self.resume_from = self.checkpoint_to_resume()
        if self.resume_from is None and cfg.resume != "latest" and self.out.is_dir() and any(self.out.iterdir()):
            raise ValueError(f"--output_dir {self.out} holds another run's files: --resume latest continues it; "
                             "give an empty or new folder for a new run")
        if cfg.clear_cache and self.main:
            clear_feature_cache(cfg)
        self.accelerator.wait_for_everyone()
        self.world = self.accelerator.num_processes
        self.global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * self.world
        self.shift = cfg.flow_shift  # None: the model's (`spec.model_spec`), known once it is loaded
        self.progress = Progress(global_batch=self.global_batch, mode=cfg.mode)
        self._vae: torch.nn.Module | None = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    # -------------------------------------------------------------------------------------------- data

    def prepare_data(self) -> None:
        """Scan, report bad data, fill the feature cache (each process its share), plan the records."""
        cfg, acc = self.cfg, self.accelerator
        found = data.scan(cfg.data_dir, cfg.min_image_size if cfg.min_image_size is not None else cfg.resolution // 2)
        if found.bad:
            listing = "\n".join(found.bad)
            if cfg.on_bad_data == "error":
                raise ValueError(f"{len(found.bad)} bad training files (--on_bad_data error):\n{listing}")
            if self.main:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / "bad_data.txt").write_text(listing + "\n")
            log.warning("skipping %d bad training files (listed in %s):\n%s", len(found.bad),
                        self.out / "bad_data.txt", listing)
        if not found.samples:
            raise ValueError(f"--data_dir {cfg.data_dir}: no usable image + caption pair (all {len(found.bad)} bad)")
        self.samples = found.samples
        dit_path, vae_path, te_path = model_parts(cfg)
        self.dit_path, self.vae_path = dit_path, vae_path
        encode_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        vae_id, vae = encoder_identity(vae_path, lambda: load_dcae(vae_path, encode_dtype), self.cache_dir)
        text_id, te = encoder_identity(te_path, lambda: load_text_encoder(te_path, encode_dtype), self.cache_dir,
                                       f"max_length={cfg.max_sequence_length}")
        self.records = data.plan_cache(self.samples, self.cache_dir, vae_id, text_id, cfg.resolution,
                                       cfg.multi_scale)
        if self.main:
            log.info("feature cache: %s (reused by later runs; --clear_cache or deleting the folder empties it)",
                     self.cache_dir)
        mine = slice(acc.process_index, None, self.world)
        if any(not r.latent.is_file() for r in self.records[mine]):
            vae = (vae or load_dcae(vae_path, encode_dtype)).to(self.device)
            data.cache_latents(self.samples[mine], self.records[mine], vae, self.device, cfg.encode_batch_size,
                               cfg.progress and self.main)
        del vae
        prompts = {r.text: s.caption for s, r in zip(self.samples[mine], self.records[mine])}
        prompts.update({data.text_path(self.cache_dir, p, text_id): p for p in cfg.validation_prompts})
        self.null_path = data.text_path(self.cache_dir, "", text_id, use_chi=False)
        self.prompt_paths = [data.text_path(self.cache_dir, p, text_id) for p in cfg.validation_prompts]
        todo = {p: t for p, t in prompts.items() if not p.is_file()}
        if todo or not self.null_path.is_file():
            te = (te or load_text_encoder(te_path, encode_dtype)).to(self.device)
            data.cache_text(todo, te, True, cfg.max_sequence_length, cfg.encode_batch_size, cfg.progress and self.main)
            data.cache_text({self.null_path: ""}, te, False, cfg.max_sequence_length)
        del te
        acc.wait_for_everyone()

    # -------------------------------------------------------------------------------------------- model

    def prepare_model(self) -> None:
        cfg = self.cfg
        dit = load_dit(self.dit_path, dtype=torch.float32)
        if dit.cfg.guidance_embed:
            raise ValueError(f"--model {cfg.model}: a Sana-Sprint model (distilled with sCM, not a flow model); this "
                             "trainer fine-tunes Sana / Sana 1.5 flow models")
        if self.shift is None:
            self.shift = model_spec(dit.cfg, self.dit_path).shift
        embeds, mask = data.read_text(self.null_path)
        if embeds.shape[-1] != dit.cfg.caption_channels:
            raise ValueError(f"--text_encoder gives {embeds.shape[-1]}-wide caption states but the DiT reads "
                             f"{dit.cfg.caption_channels}: a text encoder for another model?")
        learned = null_caption(self.dit_path)
        if learned is not None and tuple(learned.shape) != tuple(embeds.shape):
            log.warning("the DiT's null caption has shape %s, the captions %s: using the empty prompt's embedding "
                        "instead", tuple(learned.shape), tuple(embeds.shape))
            learned = None
        # NVlabs: the learned null caption replaces the caption and the sample keeps its mask; otherwise the
        # empty prompt (the CFG negative at inference) with its own mask
        self.null = (learned, None) if learned is not None else (embeds.float(), mask)
        if cfg.mode == "lora":
            add_lora(dit, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets), cfg.seed)
        else:
            dit.requires_grad_(True)
        if cfg.gradient_checkpointing:
            checkpoint_blocks(dit)
        dit.train()
        self.dit = dit
        self.trainable = {k: p for k, p in dit.named_parameters() if p.requires_grad}
        lr = cfg.lr * {"none": 1.0, "sqrt": math.sqrt(self.global_batch / 256),
                       "linear": self.global_batch / 256}[cfg.scale_lr]
        params = list(self.trainable.values())
        if cfg.resolved_optimizer() == "came":
            came = require("came_pytorch")
            opt = came.CAME(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999, 0.9999),
                            eps=(1e-30, 1e-16))
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / warmup if s < warmup else 1.0)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(dit, opt, sched)
        self.ema = EMA(self.trainable, cfg.ema_rate) if cfg.ema_rate else None
        self.accelerator.register_for_checkpointing(self.progress)
        if self.ema:
            self.accelerator.register_for_checkpointing(self.ema)
        if cfg.mode == "lora":
            self.accelerator.register_save_state_pre_hook(self._save_lora_state)
            self.accelerator.register_load_state_pre_hook(self._load_lora_state)

    def _save_lora_state(self, models: list, weights: list, output_dir: str) -> None:
        """accelerate hook: a LoRA checkpoint holds the adapters (ours and diffusers' file), not the whole DiT."""
        if self.main:
            write_safetensors({k: p.detach().contiguous() for k, p in self.trainable.items()},
                              Path(output_dir) / "lora_adapters.safetensors")
            save_lora(self.dit, output_dir)
        weights.clear()

    def _load_lora_state(self, models: list, input_dir: str) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(input_dir) / "lora_adapters.safetensors"))
        if set(state) != set(self.trainable):
            raise ValueError(f"--resume {input_dir}: its LoRA adapters do not match this run's (--lora_rank / "
                             "--lora_targets changed?)")
        with torch.no_grad():
            for k, p in self.trainable.items():
                p.copy_(state[k])
        models.clear()

    # -------------------------------------------------------------------------------------------- checkpoints

    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        path = self.checkpoint_root / f"step_{self.progress.step:07d}"
        self.accelerator.save_state(str(path))
        if self.main:
            for written in path.glob("*.safetensors"):  # accelerate's model.safetensors too
                normal_mode(written)
            (path / "train_config.json").write_text(dump(self.cfg))
            (self.checkpoint_root / "latest").write_text(path.name)
            limit = self.cfg.checkpoints_total_limit
            if limit:
                import shutil

                for old in sorted(self.checkpoint_root.glob("step_*"))[:-limit]:
                    shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return path

    def checkpoint_to_resume(self) -> Path | None:
        """The checkpoint --resume names: a folder, or with 'latest' the newest in --output_dir; None when there
        is nothing to resume ('latest' in a folder without checkpoints starts fresh, as diffusers' scripts do)."""
        target = self.cfg.resume
        if target is None:
            return None
        if target == "latest":
            latest = self.checkpoint_root / "latest"
            if not latest.is_file():
                log.info("--resume latest: no checkpoint in %s yet, starting a new run", self.checkpoint_root)
                return None
            path = self.checkpoint_root / latest.read_text().strip()
        else:
            path = Path(target)
        if not (path / "custom_checkpoint_0.pkl").is_file():
            raise FileNotFoundError(f"--resume {target}: {path} is not a checkpoint of this trainer")
        return path

    def resume(self, path: Path) -> None:
        """Load the checkpoint `path` (weights or LoRA, optimizer, schedule, progress, RNG) and cut the log's rows
        after its step (written by the interrupted run after it was saved), so no step is logged twice."""
        want = (self.global_batch, self.cfg.mode)
        self.accelerator.load_state(str(path))
        if (self.progress.global_batch, self.progress.mode) != want:
            raise ValueError(f"--resume {path}: saved with global batch {self.progress.global_batch} and mode "
                             f"{self.progress.mode!r}, this run has {want[0]} and {want[1]!r}")
        log.info("resumed from %s at step %d", path, self.progress.step)
        log_file = self.out / "train_log.csv"
        if self.main and log_file.is_file():
            lines = log_file.read_text().splitlines(keepends=True)
            kept = lines[:1] + [ln for ln in lines[1:] if int(ln.split(",", 1)[0]) <= self.progress.step]
            log_file.write_text("".join(kept))

    # -------------------------------------------------------------------------------------------- validation

    @torch.no_grad()
    def validate(self) -> Path | None:
        """Sample the validation prompts with the current weights (EMA off) and save a grid (main process)."""
        cfg = self.cfg
        if not cfg.validation_prompts:  # (never with --fsdp: the config refuses that pair)
            return None
        path = None
        if self.main:
            dit = self.accelerator.unwrap_model(self.model)
            dit.eval()
            texts = [data.read_text(p) for p in self.prompt_paths]
            neg, neg_mask = data.read_text(self.null_path)
            with self.accelerator.autocast():
                latents = sample_latents(dit, torch.stack([e for e, _ in texts]), torch.stack([m for _, m in texts]),
                                         neg, neg_mask, cfg.resolution, cfg.resolution,
                                         cfg.validation_sampling_steps, cfg.validation_guidance_scale, self.shift,
                                         cfg.seed)
            dit.train()
            if self._vae is None:
                self._vae = load_dcae(self.vae_path, torch.float32)
            from ..dcae import run_finite

            vae = self._vae.to(self.device)
            images = (run_finite(vae, "decode", vae.unscale(latents.float())).float() / 2 + 0.5).clamp(0, 1).cpu()
            self._vae.to("cpu")
            path = self.out / "validation" / f"step_{self.progress.step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image_grid(images).save(path)
            log.info("validation grid: %s", path)
        self.accelerator.wait_for_everyone()
        return path

    # -------------------------------------------------------------------------------------------- the loop

    def micro_step(self, indices: list[int], start: int, step: int) -> torch.Tensor:
        """Forward + backward of one micro-batch (this process's slice from global position `start`); returns
        its mean loss (detached)."""
        cfg = self.cfg
        x0, embeds, mask = data.load_batch([self.records[i] for i in indices])
        draws = [sample_randomness(cfg, step, start + j, tuple(x0.shape[1:]), self.shift) for j in range(len(indices))]
        sigmas = torch.cat([s for s, _, _ in draws])
        noise = torch.cat([n for _, n, _ in draws])
        drop = torch.tensor([d for _, _, d in draws])
        embeds, mask = drop_captions(embeds, mask, drop, *self.null)
        dev = self.device
        with self.accelerator.autocast():
            loss = flow_loss(self.model, x0.to(dev), noise.to(dev), sigmas.to(dev), embeds.float().to(dev),
                             mask.to(dev), cfg.loss_weighting).mean()
        self.accelerator.backward(loss / cfg.gradient_accumulation_steps)
        return loss.detach()

    def total_steps(self, batches_per_epoch: int) -> int:
        return self.cfg.max_steps or self.cfg.num_epochs * batches_per_epoch

    def run(self) -> dict[str, Any]:
        """Train; returns {"outputs": paths written, "losses": loss per step, "steps": steps done}."""
        cfg, acc = self.cfg, self.accelerator
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.prepare_data()
        self.prepare_model()
        if self.resume_from is not None:
            self.resume(self.resume_from)
        buckets = [r.bucket for r in self.records]
        per_epoch = len(data.epoch_batches(buckets, self.global_batch, cfg.seed, 0))
        if per_epoch == 0:
            sizes = {b: buckets.count(b) for b in sorted(set(buckets))}
            raise ValueError(f"{len(buckets)} images (per bucket {sizes}) make no full global batch of "
                             f"{self.global_batch} (--batch_size x --gradient_accumulation_steps x processes): lower "
                             "them" + (" or drop --multi_scale" if cfg.multi_scale else ""))
        total = self.total_steps(per_epoch)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(dump(cfg))
            log.info("training %s: %d images, %d steps, global batch %d (%d x %d x %d processes, %s), %d batches "
                     "an epoch, %d trainable parameters", cfg.mode, len(self.records), total, self.global_batch,
                     cfg.batch_size, cfg.gradient_accumulation_steps, self.world,
                     self.accelerator.distributed_type.value, per_epoch,
                     sum(p.numel() for p in self.trainable.values()))
        log_file = self.out / "train_log.csv"
        if self.main and (self.resume_from is None or not log_file.is_file()):
            log_file.write_text("step,epoch,loss,lr,grad_norm,seconds\n")
        losses: list[float] = []
        bar = tqdm(total=total, initial=self.progress.step, desc=f"training ({cfg.mode})",
                   disable=not (cfg.progress and self.main))
        clip = cfg.resolved_max_grad_norm()
        p = self.progress
        with logging_redirect_tqdm():  # log lines (checkpoints, validation) above the bar, not through it
            while p.step < total:
                batches = data.epoch_batches(buckets, self.global_batch, cfg.seed, p.epoch)
                while p.position < len(batches) and p.step < total:
                    started = time.perf_counter()
                    batch = batches[p.position]
                    loss_sum = torch.zeros((), device=self.device)
                    micro = list(data.micro_batches(batch, cfg.gradient_accumulation_steps, self.world,
                                                    acc.process_index))
                    for m, (start, indices) in enumerate(micro):
                        sync = m == len(micro) - 1
                        with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                            loss_sum += self.micro_step(indices, start, p.step)
                    grad_norm = acc.clip_grad_norm_(list(self.trainable.values()), clip) if clip > 0 else None
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema:
                        self.ema.update(self.trainable)
                    loss = float(acc.reduce(loss_sum / len(micro), "mean"))
                    p.step, p.position = p.step + 1, p.position + 1
                    losses.append(loss)
                    seconds = time.perf_counter() - started
                    lr = self.scheduler.get_last_lr()[0]
                    if self.main:
                        norm = "" if grad_norm is None else f"{float(grad_norm):.6g}"
                        with open(log_file, "a", newline="") as f:
                            csv.writer(f).writerow([p.step, p.epoch, f"{loss:.6g}", f"{lr:.6g}", norm,
                                                    f"{seconds:.3f}"])
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{self.global_batch / seconds:.1f}")
                    bar.update(1)
                    if cfg.checkpointing_steps and p.step % cfg.checkpointing_steps == 0 and p.step < total:
                        self.save_checkpoint()
                    if cfg.validation_steps and p.step % cfg.validation_steps == 0:
                        self.validate()
                if p.position >= len(batches):
                    p.epoch, p.position = p.epoch + 1, 0
        bar.close()
        checkpoint = self.save_checkpoint()
        outputs = ([checkpoint] if self.main else []) + self.save_result()
        return {"outputs": outputs, "losses": losses, "steps": p.step}

    def save_result(self) -> list[Path]:
        """The trained weights: `pytorch_lora_weights.safetensors` (LoRA) or `sana_finetuned.{safetensors,pth}`
        (full, NVlabs layout); with EMA also `*_ema` versions."""
        cfg, acc = self.cfg, self.accelerator
        sd = acc.get_state_dict(self.model) if cfg.mode == "full" else None  # gathers FSDP shards (all ranks)
        written: list[Path] = []
        if self.main:
            dit = acc.unwrap_model(self.model)
            null = self.null[0]
            if null.shape[0] < cfg.max_sequence_length:  # the empty prompt's trimmed rows
                null = torch.nn.functional.pad(null, (0, 0, 0, cfg.max_sequence_length - null.shape[0]))
            variants = [("", contextlib.nullcontext)]
            if self.ema:
                variants.append(("_ema", functools.partial(self.ema.applied, self.trainable)))
            for suffix, weights in variants:
                with weights():
                    if cfg.mode == "lora":
                        written.append(save_lora(dit, self.out / f"pytorch_lora_weights{suffix}.safetensors"))
                    else:
                        state = sd if not suffix else {k: v for k, v in dit.state_dict().items()}
                        written += save_full(state, dit.cfg, null, self.out / f"sana_finetuned{suffix}",
                                             DTYPES[cfg.save_dtype])
            log.info("saved %s", ", ".join(map(str, written)))
        acc.wait_for_everyone()
        return written


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job (see `Trainer`)."""
    return Trainer(cfg).run()

