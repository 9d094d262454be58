"""Whole training runs on a tiny Sana in the real diffusers layout and 4 captioned images (fp32, CPU, 1 thread:
tiny models gain nothing from threads and lose a lot on a busy 2-core machine)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sana_core.checkpoints.dit import load_dit, save_dit
from sana_core.tiny import write_tiny_pipeline
from sana_core.train import data
from sana_core.train.config import TrainConfig
from sana_core.train.trainer import Trainer, sample_latents

CAPTIONS = ["a cat sleeping on a sunny windowsill", "portrait of an old man with a white beard",
            "a busy city street at night, neon lights and rain", "An astronaut riding a horse on the moon"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder, data folder, cache folder). As in a real Sana, the DiT's initial velocity and the scaled
    latents are O(1): the tiny DiT's output layer is scaled down and the tiny DC-AE's scaling factor set to
    1 / the std of the training images' raw latents."""
    from PIL import Image

    from sana_core.checkpoints.dcae import load_dcae

    root = tmp_path_factory.mktemp("train")
    model = write_tiny_pipeline(root / "model", seed=3)
    dit = load_dit(model, dtype=torch.float32)
    with torch.no_grad():
        dit.final_layer.linear.weight.mul_(0.1)
    save_dit(dit, model / "transformer")
    folder = root / "data"
    folder.mkdir()
    for i, caption in enumerate(CAPTIONS):
        a = np.zeros((128, 128, 3), np.uint8)
        a[..., i % 3] = 220
        a[:, : 32 * (i + 1)] = 50 * i
        Image.fromarray(a).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption + "\nonly the first line is the caption")
    pixels = torch.stack([data.load_image(folder / f"img{i}.png", 128, 128) for i in range(4)])
    with torch.no_grad():
        std = float(load_dcae(model).encode(pixels).std())
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    (model / "vae" / "config.json").write_text(json.dumps({**vae_config, "scaling_factor": 1 / std}))
    return model, folder, root / "cache"


def config(setup, out, **kw):
    model, folder, cache = setup
    return TrainConfig(**{"data_dir": [str(folder)], "model": str(model), "output_dir": str(out),
                          "cache_dir": str(cache), "resolution": 128, "batch_size": 4, "checkpointing_steps": 0,
                          "progress": False, **kw})


def distance_to_training_latents(dit, setup, trainer):
    """Mean squared distance of latents sampled (10 steps, no CFG) for each training caption to that image's
    latent."""
    x0, embeds, mask = data.load_batch(trainer.records)
    neg, neg_mask = data.read_text(trainer.null_path)
    dit.eval()
    got = sample_latents(dit, embeds, mask, neg, neg_mask, 128, 128, steps=10, guidance_scale=1.0, seed=1)
    return float(((got - x0) ** 2).mean())


LORA = dict(lora_rank=16, lora_targets=["to_q", "to_k", "to_v", "to_out.0", "proj_out"])


@pytest.mark.parametrize("mode,lr,factor,kw", [("full", 2e-3, 3.0, {}), ("lora", 1e-2, 1.25, LORA)])
def test_finetune_lowers_loss_and_moves_samples(setup, tmp_path, mode, lr, factor, kw):
    """200 steps on the 4 images: the mean loss of the last 20 steps is `factor` times below the first 20's, and
    samples for the training captions come closer to the training latents."""
    trainer = Trainer(config(setup, tmp_path, mode=mode, lr=lr, max_steps=200, optimizer="adamw", **kw))
    result = trainer.run()
    losses = result["losses"]
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    print(f"{mode}: loss {first:.3f} -> {last:.3f} ({first / last:.2f}x)")
    assert first / last > factor
    base = load_dit(setup[0], dtype=torch.float32)
    before = distance_to_training_latents(base, setup, trainer)
    after = distance_to_training_latents(trainer.accelerator.unwrap_model(trainer.model), setup, trainer)
    print(f"{mode}: sample-to-image distance {before:.3f} -> {after:.3f}")
    assert after < 0.8 * before
    name = "sana_finetuned.safetensors" if mode == "full" else "pytorch_lora_weights.safetensors"
    assert (tmp_path / name).is_file() and (tmp_path / "train_log.csv").read_text().count("\n") == 201


def test_full_finetune_file_reloads_bit_identically(setup, tmp_path):
    """The NVlabs-layout .safetensors and .pth reload (our loader) to exactly the trained weights, and diffusers'
    single-file loader reads the same weights (same forward)."""
    from diffusers import SanaTransformer2DModel

    trainer = Trainer(config(setup, tmp_path, mode="full", max_steps=3, lr=1e-3))
    trainer.run()
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    for name in ("sana_finetuned.safetensors", "sana_finetuned.pth"):
        reloaded = load_dit(tmp_path / name, dtype=None).state_dict()
        assert reloaded.keys() == trained.keys()
        assert all(torch.equal(reloaded[k], trained[k]) for k in trained), name
    sd = load_file(tmp_path / "sana_finetuned.safetensors")
    assert {"pos_embed", "y_embedder.y_embedding"} <= set(sd) and sd["y_embedder.y_embedding"].shape == (300, 64)
    theirs = SanaTransformer2DModel.from_single_file(str(tmp_path / "sana_finetuned.safetensors"),
                                                     config=str(setup[0]), subfolder="transformer").float()
    ours = load_dit(tmp_path / "sana_finetuned.safetensors", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 32, 4, 4, generator=g), torch.randn(1, 8, 64, generator=g)
    with torch.no_grad():
        want = theirs(hidden_states=x, encoder_hidden_states=ctx, timestep=torch.tensor([500.0]),
                      return_dict=False)[0]
        torch.testing.assert_close(ours(x, torch.tensor([500.0]), ctx), want, rtol=1e-4, atol=5e-5)


def _final_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.trainable.items()}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_equals_uninterrupted(setup, tmp_path, mode):
    """3 steps, stop, resume from `latest`, 3 more = 6 in one go: the same losses and weights (bit-exact here,
    asserted to 1e-6), with CAME, gradient accumulation, caption dropout and EMA on, and 2 epochs crossed."""
    kw = dict(mode=mode, lr=1e-3, batch_size=1, gradient_accumulation_steps=2, optimizer="came", ema_rate=0.9,
              caption_dropout=0.5, warmup_steps=2)
    whole = Trainer(config(setup, tmp_path / "whole", max_steps=6, **kw))
    want = whole.run()
    Trainer(config(setup, tmp_path / "split", max_steps=3, **kw)).run()
    second = Trainer(config(setup, tmp_path / "split", max_steps=6, resume="latest", **kw))
    got = second.run()
    np.testing.assert_allclose(got["losses"], want["losses"][3:], rtol=1e-6)
    a, b = _final_state(whole), _final_state(second)
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)
    assert all(torch.allclose(whole.ema.shadow[k], second.ema.shadow[k], rtol=1e-6, atol=1e-7) for k in a)


def test_two_processes_equal_one(setup, tmp_path):
    """`accelerate launch --num_processes 2` (gloo on the CPU) with 2 images a process reaches the weights of one
    process with 4 (same global batch): within 1e-5 absolute after 4 AdamW steps of lr 1e-3, i.e. 0.25% of the
    4e-3 a weight can move (the all-reduce sums the gradients in another order; Adam's normalisation magnifies
    that on near-zero gradients: 3e-6 measured). `--fsdp` there is an error: accelerate shards only on GPUs."""
    one = Trainer(config(setup, tmp_path / "one", mode="full", max_steps=4, lr=1e-3, optimizer="adamw"))
    one.run()
    model, folder, cache = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sana_core.train",
           "--device", "cpu", "--data_dir", str(folder), "--model", str(model), "--cache_dir", str(cache),
           "--output_dir", str(tmp_path / "two"), "--resolution", "128", "--batch_size", "2", "--max_steps", "4",
           "--lr", "1e-3", "--mode", "full", "--optimizer", "adamw", "--progress", "false"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes, MULTI_CPU)" in run.stderr, run.stderr[-3000:]
    fsdp = subprocess.run(cmd[:-2] + ["--output_dir", str(tmp_path / "fsdp"), "--fsdp"] + cmd[-2:], env=env,
                          capture_output=True, text=True, timeout=240)
    assert fsdp.returncode != 0 and "--fsdp: accelerate shards with FSDP only over several GPU" in fsdp.stderr
    two = load_dit(tmp_path / "two" / "sana_finetuned.safetensors", dtype=torch.float32).state_dict()
    for k, v in one.accelerator.unwrap_model(one.model).state_dict().items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5)


def test_bf16_mixed_precision_runs_close_to_fp32(setup, tmp_path):
    """--dtype bf16 (autocast; weights and optimizer stay fp32) follows the fp32 run: the losses of 3 steps
    agree to bf16's precision (2% relative here) and the weights stay fp32."""
    from accelerate.state import AcceleratorState  # one precision per process: reset between the two runs

    kw = dict(mode="full", max_steps=3, lr=1e-3, optimizer="adamw", device="cpu")
    fp32 = Trainer(config(setup, tmp_path / "fp32", dtype="fp32", **kw)).run()
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        mixed = Trainer(config(setup, tmp_path / "bf16", dtype="bf16", **kw))
        got = mixed.run()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    np.testing.assert_allclose(got["losses"], fp32["losses"], rtol=2e-2)
    assert got["losses"] != fp32["losses"]  # bf16 autocast did act
    assert all(p.dtype == torch.float32 for p in mixed.accelerator.unwrap_model(mixed.model).parameters())


def test_validation_grids_and_checkpoint_limit(setup, tmp_path):
    """Validation grids every --validation_steps (2 prompts side by side at the training size, not blank) and only
    the newest --checkpoints_total_limit checkpoints kept, `latest` pointing at the last."""
    from PIL import Image

    trainer = Trainer(config(setup, tmp_path, mode="lora", max_steps=2, validation_prompts=["a cat", "a tower"],
                             validation_steps=1, validation_sampling_steps=2, checkpointing_steps=1,
                             checkpoints_total_limit=1))
    trainer.run()
    grids = sorted((tmp_path / "validation").glob("step_*.png"))
    assert [g.name for g in grids][-2:] == ["step_0000001.png", "step_0000002.png"]
    grid = np.asarray(Image.open(grids[-1]))
    assert grid.shape == (128, 256, 3) and grid.std() > 1
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_0000002"] and (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_output_folder_resume_latest_log_rows_modes_and_quiet_logs(setup, tmp_path, caplog):
    """A new run refuses a folder holding another run; --resume latest with nothing to resume starts fresh (one
    line says so); the feature cache's path is logged; accelerate's per-checkpoint INFO lines stay quiet; every
    file has the usual mode (0644 under umask 022, safetensors included); a resume after an interruption keeps one
    log row per step (the rows the interrupted run wrote after its last checkpoint are replaced)."""
    import logging
    import os

    out = tmp_path / "out"
    caplog.set_level(logging.INFO)
    kw = dict(mode="lora", lr=1e-3, batch_size=2, checkpointing_steps=1)
    Trainer(config(setup, out, max_steps=2, resume="latest", **kw)).run()
    assert f"--resume latest: no checkpoint in {out / 'checkpoints'} yet, starting a new run" in caplog.text
    assert f"feature cache: {setup[2]} (reused by later runs; --clear_cache" in caplog.text
    assert not [r for r in caplog.records if r.name.startswith("accelerate") and r.levelno < logging.WARNING]
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert "pytorch_lora_weights.safetensors" in modes and "checkpoints/step_0000001/lora_adapters.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes
    with pytest.raises(ValueError, match=f"--output_dir {out} holds another run's files: --resume latest"):
        Trainer(config(setup, out, max_steps=2, **kw))
    # interrupted after step 2 was logged but before its checkpoint: latest still points at step 1
    (out / "checkpoints" / "latest").write_text("step_0000001")
    Trainer(config(setup, out, max_steps=3, resume="latest", **kw)).run()
    steps = [line.split(",")[0] for line in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3"]
