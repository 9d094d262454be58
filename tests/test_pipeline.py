"""Whole generations against diffusers' pipelines on the same tiny folder, seed and settings (fp32, CPU)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sana_core.pipeline import SanaPipeline
from sana_core.tiny import write_tiny_pipeline

PROMPTS = ["a cat sleeping on a sunny windowsill", "portrait of an old man"]
SIZE = dict(height=128, width=192)
# whole generations in fp32 (values O(1)); Gemma's cached instruction prefix sums in another order (1.3e-5 seen)
TOL = dict(rtol=1e-4, atol=5e-5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("sana"), seed=11)


@pytest.fixture(scope="module")
def sprint_folder(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("sprint"), seed=12, sprint=True)


@pytest.fixture(scope="module")
def ours(folder):
    return SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")


def _diffusers(cls, folder, **kw):
    return cls.from_pretrained(folder, torch_dtype=torch.float32, **kw).to("cpu")


def _theirs(pipe, output_type, seed=5, **kw):
    kw = {"prompt": PROMPTS, "negative_prompt": "", "num_inference_steps": 20, "guidance_scale": 4.5,
          "use_resolution_binning": False, **SIZE, **kw}
    return pipe(**kw, generator=torch.Generator().manual_seed(seed), output_type=output_type).images


def test_20_step_cfg_matches_sana_pipeline(folder, ours):
    from diffusers import SanaPipeline as Ref

    ref = _diffusers(Ref, folder)
    want_latent = _theirs(ref, "latent")
    got_latent = ours(PROMPTS, seed=5, output_type="latent", progress=False, **SIZE)
    torch.testing.assert_close(got_latent, want_latent, **TOL)
    want = _theirs(ref, "pt")
    got = ours(PROMPTS, seed=5, output_type="pt", progress=False, **SIZE)
    assert got.shape == (2, 3, 128, 192)
    torch.testing.assert_close(got, want, **TOL)
    pil = ours(PROMPTS, seed=5, progress=False, **SIZE)
    assert pil[0].size == (192, 128)


def test_flow_euler_matches_flow_match_euler(folder, ours):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import SanaPipeline as Ref

    ref = _diffusers(Ref, folder, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    want = _theirs(ref, "latent", num_inference_steps=8)
    got = ours(PROMPTS, seed=5, output_type="latent", progress=False, sampler="flow_euler", num_inference_steps=8,
               truncate_timesteps=False, **SIZE)  # diffusers' FlowMatchEuler feeds untruncated timesteps
    torch.testing.assert_close(got, want, **TOL)


def test_pag_matches_sana_pag_pipeline(folder, ours):
    from diffusers import SanaPAGPipeline

    ref = _diffusers(SanaPAGPipeline, folder, pag_applied_layers=["transformer_blocks.1"])
    want = _theirs(ref, "latent", num_inference_steps=6, pag_scale=2.0)
    got = ours(PROMPTS, seed=5, output_type="latent", progress=False, num_inference_steps=6,
               pag_scale=2.0, pag_applied_layers=["transformer_blocks.1"], **SIZE)
    torch.testing.assert_close(got, want, **TOL)
    plain = ours(PROMPTS, seed=5, output_type="latent", progress=False, num_inference_steps=6, **SIZE)
    assert (got - plain).abs().max() > 1e-3  # PAG really changed the result


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sprint_matches_sana_sprint_pipeline(sprint_folder, steps):
    from diffusers import SanaSprintPipeline

    ref = _diffusers(SanaSprintPipeline, sprint_folder)
    kw = {"prompt": PROMPTS, "num_inference_steps": steps, "guidance_scale": 4.5, "use_resolution_binning": False,
          **SIZE}
    if steps != 2:
        kw["intermediate_timesteps"] = None
    want = ref(**kw, generator=torch.Generator().manual_seed(3), output_type="latent").images
    ours = SanaPipeline.from_pretrained(sprint_folder, torch_dtype=torch.float32, device="cpu")
    assert ours.dit.cfg.guidance_embed
    got = ours(PROMPTS, seed=3, num_inference_steps=steps, guidance_scale=4.5, output_type="latent",
               progress=False, **SIZE)
    torch.testing.assert_close(got, want, **TOL)


def test_seeded_runs_are_deterministic_and_seeds_differ(ours):
    a = ours("a red fox", seed=1, num_inference_steps=3, output_type="latent", progress=False, **SIZE)
    b = ours("a red fox", seed=1, num_inference_steps=3, output_type="latent", progress=False, **SIZE)
    c = ours("a red fox", seed=2, num_inference_steps=3, output_type="latent", progress=False, **SIZE)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_num_images_per_prompt_and_callback(ours):
    seen = []
    out = ours(PROMPTS, seed=1, num_inference_steps=3, num_images_per_prompt=2, output_type="latent",
               progress=False, callback=lambda d: seen.append((d["i"], tuple(d["denoised"].shape))), **SIZE)
    assert out.shape == (4, 32, 4, 6)
    assert seen == [(i, (4, 32, 4, 6)) for i in range(3)]


@pytest.mark.parametrize("kw,match", [
    ({"height": 100}, "height=100 must be a positive multiple of 32.*use 96 or 128"),
    ({"width": 0}, "width=0"),
    ({"num_inference_steps": 0}, "num_inference_steps=0 must be at least 1"),
    ({"sampler": "dpmpp_3m"}, "unknown sampler 'dpmpp_3m'; valid: flow_dpmpp_2m, flow_euler, scm"),
    ({"prompt": []}, "prompt is empty"),
    ({"pag_scale": 2.0, "pag_applied_layers": [5]}, r"pag_layers \[5\] must be block indices in 0..1"),
    ({"pag_scale": 2.0, "pag_applied_layers": "transformer_blocks.*"}, "regular expressions over layer names"),
    ({"strength": 0.5}, "strength acts on an image to start from"),
    ({"controlnet_conditioning_scale": 0.5}, "controlnet_conditioning_scale act on a ControlNet"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt=0 must be at least 1"),
    ({"image": torch.rand(3, 3, 64, 64), "strength": 0.5, "prompt": ["a", "b"]}, r"image: 3 given for 2 prompt"),
])
def test_bad_arguments(ours, kw, match):
    args = {"prompt": "a cat", **SIZE, "progress": False, **kw}
    with pytest.raises(ValueError, match=match):
        ours(**args)


def test_fp16_overflow_falls_back(folder, caplog):
    """An overflowing fp16 DiT is widened to bf16 with a warning (the one mechanism, `precision.run_finite`),
    step and pipeline finish; inf/NaN in bf16 is a FloatingPointError naming the dtype."""
    import logging

    from sana_core.denoiser import SanaDenoiser

    pipe = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float16, vae_dtype=torch.float32, device="cpu")
    assert pipe.text_encoder.dtype != torch.float16  # Gemma is never run in fp16
    with torch.no_grad():
        pipe.dit.final_layer.linear.weight.mul_(1e5)  # forces an fp16 overflow in the output projection
    cond, uncond = pipe.encode_prompt(["a cat"], [""])
    x = torch.randn(1, 32, 4, 6)
    with caplog.at_level(logging.WARNING):
        step = SanaDenoiser(pipe.dit, cond, uncond)(x, torch.tensor([0.9]))
    assert torch.isfinite(step).all() and pipe.dit.dtype == torch.bfloat16
    assert "the DiT overflowed in float16 (inf/NaN); computing in torch.bfloat16" in caplog.text
    pipe.dit.to(torch.float16)
    out = pipe("a cat", seed=0, num_inference_steps=2, output_type="latent", progress=False, **SIZE)
    assert torch.isfinite(out).all() and pipe.dit.dtype == torch.bfloat16
    with torch.no_grad():
        pipe.dit.final_layer.linear.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="inf/NaN while sampling in torch.bfloat16"):
        pipe("a cat", seed=0, num_inference_steps=2, output_type="latent", progress=False, **SIZE)


def test_separate_files_give_the_same_images(folder, ours, tmp_path):
    """NVlabs .pth DiT + efficientvit DC-AE + ComfyUI single-file Gemma == the diffusers folder."""
    from sana_core.checkpoints.dit import load_dit, save_dit
    from sana_core.tiny import write_tiny_dcae, write_tiny_gemma

    dit = save_dit(load_dit(folder), tmp_path / "Sana_600M_1024px_MultiLing.pth", layout="nvlabs")
    vae = write_tiny_dcae(tmp_path / "dc-ae", seed=11 + 2, layout="efficientvit")
    write_tiny_gemma(tmp_path / "gemma", seed=11, single_file=tmp_path / "gemma_2_2b.safetensors")
    pipe = SanaPipeline.from_pretrained(None, dit=dit, vae=vae, text_encoder=tmp_path / "gemma_2_2b.safetensors",
                                        torch_dtype=torch.float32, device="cpu")
    kw = dict(seed=2, num_inference_steps=3, output_type="pt", progress=False, **SIZE)
    torch.testing.assert_close(pipe("a red fox", **kw), ours("a red fox", **kw), rtol=0, atol=0)


def _fake_repo(root):
    """A Sana diffusers repo's file list: full-precision and fp16 weights of every part (like the real repos)."""
    files = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
             "tokenizer/tokenizer_config.json", "tokenizer/tokenizer.model"]
    for part, stem in (("transformer", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        files += [f"{part}/config.json", f"{part}/{stem}.safetensors", f"{part}/{stem}.fp16.safetensors"]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("x")
    return files


@pytest.mark.parametrize("args,want", [
    (dict(variant="fp16"), {"transformer", "vae", "text_encoder", "tokenizer"}),
    (dict(variant="bf16"), {"transformer", "vae", "text_encoder", "tokenizer"}),  # no bf16 files: full precision
    (dict(variant="none", parts=("vae",)), {"vae"}),
])
def test_hub_fetches_only_the_parts_and_precision_needed(monkeypatch, tmp_path, args, want):
    """A mocked hub (huggingface_hub's own pattern filter on a fake repo): which files each call fetches."""
    import shutil

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from sana_core import hub

    repo = tmp_path / "repo"
    files = _fake_repo(repo)
    fetched = []

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kw):
        got = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        fetched.extend(got)
        snap = tmp_path / "snapshot"
        for f in got:
            (snap / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / f, snap / f)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    parts = args.pop("parts", ("transformer", "vae", "text_encoder"))
    root = hub.resolve("Efficient-Large-Model/Sana_600M_1024px_diffusers", parts, hub.check_variant(args["variant"]))
    weights = {f for f in fetched if f.endswith(".safetensors")}
    assert {f.split("/")[0] for f in fetched if "/" in f} == want
    if args["variant"] == "fp16":
        assert weights == {f for f in files if f.endswith(".fp16.safetensors")}
    else:  # full precision only, never both
        assert weights and not any(".fp16." in f for f in weights)
    assert all(p.split("/")[0] in want for p in weights) and (root / "model_index.json").exists()


def test_hub_references_and_defaults(monkeypatch, tmp_path):
    """Local paths win; repo/file fetches one file; with only the DiT given, the default repo's transformer is not
    fetched; the variant follows the dtype."""
    import huggingface_hub

    from sana_core import hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns=None, **kw: calls.append((repo, allow_patterns)) or str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, f: calls.append(("file", repo, f)) or str(tmp_path / f))
    assert hub.resolve(tmp_path) == tmp_path
    hub.resolve("hf://Efficient-Large-Model/Sana_1600M_1024px/checkpoints/Sana_1600M_1024px.pth")
    assert calls[-1] == ("file", "Efficient-Large-Model/Sana_1600M_1024px", "checkpoints/Sana_1600M_1024px.pth")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face repo id"):
        hub.resolve("./missing_folder")
    monkeypatch.setattr(SanaPipeline, "__init__", lambda self, *a, **k: None)
    import sana_core.pipeline as P

    for name in ("load_dit", "load_dcae", "load_text_encoder"):
        monkeypatch.setattr(P, name, lambda *a, **k: SimpleNamespace(cfg=SimpleNamespace(scaling_factor=1.0)))
    monkeypatch.setattr(P, "model_spec", lambda *a, **k: None)
    calls.clear()
    with pytest.warns(FutureWarning, match="dtype= is deprecated, use torch_dtype="):  # the old name still works
        SanaPipeline.from_pretrained(dit=str(tmp_path), model="Efficient-Large-Model/Sana_600M_1024px_diffusers",
                                     dtype=torch.float16)
    repo, allow = calls[0]  # (a second call falls back to full precision: the mock holds no fp16 files)
    assert not any(p.startswith("transformer/") for p in allow) and "vae/*.fp16.safetensors" in allow
    assert "scheduler/*.json" in allow  # the scheduler's flow_shift: the model's default shift
    assert hub.default_variant(torch.bfloat16) == "bf16" and hub.default_variant(torch.float32) is None


def test_image_to_image_starts_part_way(ours):
    from sana_core.samplers import flow_sigmas

    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, *SIZE.values(), generator=g)
    init = ours.vae.scale(ours.vae.encode(image * 2 - 1))
    sigmas = []
    out = ours("a cat", seed=1, num_inference_steps=4, image=image, strength=0.5, output_type="latent",
               progress=False, callback=lambda d: sigmas.append(float(d["sigma"])), **SIZE)
    assert sigmas == pytest.approx(flow_sigmas(8)[-5:-1].tolist())  # the last 4 of an 8-step schedule
    light = ours("a cat", seed=1, num_inference_steps=4, image=image, strength=0.02, output_type="latent",
                 progress=False, **SIZE)
    full = ours("a cat", seed=1, num_inference_steps=4, output_type="latent", progress=False, **SIZE)
    dist = lambda a: ((a - init).norm() / init.norm()).item()  # noqa: E731
    assert dist(light) < 0.1 < dist(out) < dist(full)



def test_pictures_in_any_form_and_size(ours, tmp_path):
    """image= / mask_image= take a path, a PIL image or a tensor of any size (resized to cover and centre-
    cropped, `images.load_image` / `load_mask`): the same start in each form; a wider picture is cropped."""
    from PIL import Image

    from sana_core.images import load_image, load_mask

    g = torch.Generator().manual_seed(0)
    wide = torch.rand(1, 3, 128, 256, generator=g)
    pil = Image.fromarray((wide[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    pil.save(tmp_path / "wide.png")
    Image.fromarray(np.full((128, 256), 255, np.uint8)).save(tmp_path / "mask.png")
    as_tensor = load_image(pil, **SIZE)
    assert as_tensor.shape == (1, 3, *SIZE.values())
    torch.testing.assert_close(load_image(tmp_path / "wide.png", **SIZE), as_tensor)
    assert torch.equal(load_mask(tmp_path / "mask.png", **SIZE), torch.ones(1, *SIZE.values()))
    run = dict(seed=1, num_inference_steps=2, strength=0.5, output_type="latent", progress=False, **SIZE)
    want = ours("a cat", image=as_tensor, **run)
    assert torch.equal(ours("a cat", image=tmp_path / "wide.png", **run), want)
    assert torch.equal(ours("a cat", image=pil, **run), want)
    assert torch.equal(ours("a cat", image=pil, mask_image=tmp_path / "mask.png", **run),
                       ours("a cat", image=pil, mask_image=torch.ones(128, 192), **run))


def test_diffusers_names_old_names_and_callbacks(ours):
    """pag_scale / pag_applied_layers are diffusers' names (the old ones warn and give the same image);
    everything after the prompt is a keyword; callback_on_step_end gets each step's result as diffusers'."""
    run = dict(seed=3, num_inference_steps=3, output_type="latent", progress=False, **SIZE)
    new = ours("a cat", pag_scale=1.5, pag_applied_layers=["transformer_blocks.1"], **run)
    with pytest.warns(FutureWarning, match="pag_guidance_scale= is deprecated, use pag_scale="):
        old = ours("a cat", pag_guidance_scale=1.5, pag_layers=[1], **run)
    assert torch.equal(new, old)
    with pytest.raises(TypeError):
        ours("a cat", "a negative")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['guidance'\]"):
        ours("a cat", guidance=3.0, **run)
    seen, x = [], []
    out = ours("a cat", callback=lambda d: x.append(d["x"]),
               callback_on_step_end=lambda pipe, i, t, kw: seen.append((pipe, i, float(t), kw["latents"])) or kw,
               **run)
    from sana_core.samplers import flow_sigmas

    want_t = [float(ours.dit.timestep(s.reshape(1))) for s in flow_sigmas(3)[:3]]  # int(1000 sigma): 999, 856, 599
    assert [s[:3] for s in seen] == [(ours, i, t) for i, t in enumerate(want_t)] and want_t[0] == 999
    assert all(torch.equal(s[3], x[i + 1]) for i, s in enumerate(seen[:2])) and torch.equal(seen[2][3], out)
    with pytest.raises(ValueError, match="callback_on_step_end returned new latents"):
        ours("a cat", callback_on_step_end=lambda pipe, i, t, kw: {"latents": kw["latents"] * 2}, **run)


def test_fp16_dcae_overflow_falls_back_to_bf16(folder, caplog):
    import logging

    pipe = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, vae_dtype=torch.float16, device="cpu")
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(1e4)  # overflows fp16 activations
        latents = torch.randn(1, 32, 4, 6, generator=torch.Generator().manual_seed(0))
        with caplog.at_level(logging.WARNING):
            image = pipe.decode(latents)
    assert torch.isfinite(image).all() and next(pipe.vae.parameters()).dtype == torch.bfloat16
    assert "the DC-AE decoder overflowed in float16" in caplog.text
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="vae.*DC-AE decoder produced inf/NaN computing in torch.bfloat16"):
        pipe.decode(latents)


def test_compiled_dit_gives_the_eager_result(folder, ours, caplog):
    import logging

    pipe = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu", compile=True)
    kw = dict(seed=4, num_inference_steps=2, output_type="latent", progress=False, **SIZE)
    with caplog.at_level(logging.INFO):
        got = pipe("a red fox", **kw)
    assert "torch.compile: sampling at (1, 32, 4, 6), compilation included" in caplog.text
    torch.testing.assert_close(got, ours("a red fox", **kw), rtol=1e-4, atol=1e-4)


def test_offload_gives_the_same_images_and_caps_the_decode(folder, ours, monkeypatch):
    """offload=True: the same images; a decode needing more than OFFLOAD_DECODE_BYTES runs in tiles."""
    import sana_core.pipeline as pipeline

    pipe = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu", offload=True)
    kw = dict(seed=3, num_inference_steps=2, progress=False, height=320, width=320)
    latents = ours("a lighthouse at dusk", output_type="latent", **kw)
    torch.testing.assert_close(pipe("a lighthouse at dusk", output_type="latent", **kw), latents, rtol=0, atol=0)
    untiled = ours.decode(latents)
    torch.testing.assert_close(pipe.decode(latents), untiled, rtol=0, atol=0)  # the budget is not reached
    monkeypatch.setattr(pipeline, "OFFLOAD_DECODE_BYTES", 1)
    tiled = (ours.vae.decode(latents / ours.vae.cfg.scaling_factor, tiled=True, tile_size=256) / 2 + 0.5).clamp(0, 1)
    capped = pipe.decode(latents)
    torch.testing.assert_close(capped, tiled, rtol=0, atol=0)
    assert not torch.equal(capped, untiled)


def test_compile_modes_reach_torch_compile(folder, monkeypatch):
    """compile=<mode> goes to torch.compile; the CUDA-graph modes mark every DiT call as a new graph step."""
    import sana_core.pipeline as pipeline

    seen, steps = [], []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    parts = pipeline.SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    for compile, mode in ((True, None), ("reduce-overhead", "reduce-overhead"), ("max-autotune", "max-autotune")):
        pipe = SanaPipeline(parts.dit, parts.vae, parts.text_encoder, device="cpu", compile=compile)
        assert seen[-1] == {"dynamic": False, "mode": mode}
        steps.clear()
        pipe("a red fox", seed=0, num_inference_steps=3, output_type="latent", progress=False, **SIZE)
        assert len(steps) == (0 if compile is True else 3)
    with pytest.raises(ValueError, match="compile='fast': expected True/False or one of default, reduce-overhead"):
        SanaPipeline(parts.dit, parts.vae, parts.text_encoder, device="cpu", compile="fast")


def test_nan_in_float32_is_an_error_after_sampling(folder):
    """bf16/fp32 outputs are checked once, after the last step (no host sync per step); NaN is an error."""
    from sana_core.denoiser import SanaDenoiser, sample

    pipe = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    cond, uncond = pipe.encode_prompt(["a cat"], [""])
    with torch.no_grad():
        pipe.dit.final_layer.linear.bias[0] = float("nan")
        denoiser = SanaDenoiser(pipe.dit, cond, uncond)
        denoiser(torch.randn(1, 32, 4, 6), torch.tensor([0.9]))  # no error yet
        with pytest.raises(FloatingPointError, match="inf/NaN while sampling in torch.float32: check the checkpoint"):
            sample(SanaDenoiser(pipe.dit, cond, uncond), torch.randn(1, 32, 4, 6), steps=2, progress=False)


def test_inpainting_keeps_the_unmasked_latent(ours):
    """mask_image: outside the mask the sampled latent is the input's (latent blending with re-noising), inside
    it is new; a mask of ones equals a plain image-to-image run at strength 1 from the same start, and a mask
    without an image is an error."""
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 128, 192, generator=g)
    mask = torch.zeros(128, 192)
    mask[32:96, 64:128] = 1  # latent pixels (1..2, 2..3)
    run = dict(seed=7, num_inference_steps=4, output_type="latent", progress=False, **SIZE)
    z = ours("a red fox", image=image, mask_image=mask, strength=1.0, **run)
    with torch.no_grad():
        init = ours.vae.scale(ours.vae.encode(image * 2 - 1))
    keep = torch.ones(4, 6, dtype=torch.bool)
    keep[1:3, 2:4] = False
    torch.testing.assert_close(z[..., keep], init[..., keep], rtol=0, atol=1e-6)
    assert (z[..., ~keep] - init[..., ~keep]).abs().mean() > 0.1
    everything = ours("a red fox", image=image, mask_image=torch.ones(128, 192), strength=0.5, **run)
    torch.testing.assert_close(everything, ours("a red fox", image=image, strength=0.5, **run), **TOL)
    with pytest.raises(ValueError, match="mask_image needs image"):
        ours("a red fox", mask_image=mask, **run)


def test_seeds_are_returned_and_the_global_rng_is_untouched(ours):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    images, seeds = ours("a cat", num_inference_steps=2, output_type="np", progress=False, return_seeds=True, **SIZE)
    assert torch.equal(torch.get_rng_state(), state) and torch.initial_seed() == 1234
    assert images.shape == (1, 128, 192, 3) and images.dtype == np.float32 and len(seeds) == 1
    again = ours("a cat", num_inference_steps=2, output_type="np", progress=False, seed=seeds[0], **SIZE)
    assert np.array_equal(images, again)
    lists = ours(["a cat", "a dog"], seed=[seeds[0], 5], num_inference_steps=2, output_type="np", progress=False, **SIZE)
    assert np.allclose(lists[0], images[0], atol=1e-5)  # an image of a seed list does not depend on its batch
    with pytest.raises(ValueError, match="output_type='jpg': expected one of pil, np, pt, latent"):
        ours("a cat", output_type="jpg")


def test_prompt_embeds_instruction_and_sequence_length(ours):
    run = dict(seed=2, num_inference_steps=2, output_type="latent", progress=False, **SIZE)
    cond, uncond = ours.encode_prompt(["a cat"], [""])
    given = ours(None, prompt_embeds=cond.embeds, prompt_attention_mask=cond.mask,
                 negative_prompt_embeds=uncond.embeds, negative_prompt_attention_mask=uncond.mask, **run)
    torch.testing.assert_close(given, ours("a cat", **run), rtol=0, atol=0)
    other = ours("a cat", complex_human_instruction=["Describe the image:", "User Prompt: "], **run)
    assert (other - given).abs().max() > 1e-3
    short, _ = ours.encode_prompt(["a cat"], None, max_length=40)
    assert short.embeds.shape[1] == 40


def test_sprint_times_reach_the_schedule(monkeypatch, sprint_folder):
    from sana_core import denoiser
    from sana_core.samplers import scm_sigmas

    pipe = SanaPipeline.from_pretrained(sprint_folder, torch_dtype=torch.float32, device="cpu")
    seen = []
    real = denoiser.denoise_sigmas
    monkeypatch.setattr(denoiser, "denoise_sigmas", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    pipe("a cat", num_inference_steps=2, max_timesteps=1.4, intermediate_timesteps=0.9, output_type="latent",
         progress=False, seed=0, **SIZE)
    torch.testing.assert_close(seen[0], scm_sigmas(2, 1.4, 0.9))


def test_settings_that_cannot_act_are_said(ours, caplog):
    import logging

    run = dict(seed=0, num_inference_steps=2, output_type="latent", progress=False, **SIZE)
    with caplog.at_level(logging.WARNING, logger="sana_core.pipeline"):
        ours("a cat", max_timesteps=1.2, **run)
        ours("a cat", complex_human_instruction="Describe:", use_chi=False, **run)
    assert "only act on the scm sampler" in caplog.text and "complex_human_instruction is not used" in caplog.text
    cond, _ = ours.encode_prompt(["a cat"])
    with pytest.raises(ValueError, match="give prompt or prompt_embeds, not both"):
        ours("a cat", prompt_embeds=cond.embeds, **run)


def test_resolution_binning_matches_diffusers(folder, ours):
    """Buckets equal diffusers' tables for every model size; a 300x500 request is made at the nearest bucket
    and resized + cropped back, as diffusers' use_resolution_binning (off by default here)."""
    from diffusers import SanaPipeline as Ref
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
    from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN

    from sana_core.resolutions import buckets

    for base, table in ((512, ASPECT_RATIO_512_BIN), (1024, ASPECT_RATIO_1024_BIN), (2048, ASPECT_RATIO_2048_BIN),
                        (4096, ASPECT_RATIO_4096_BIN)):
        assert buckets(base) == {float(k): (int(v[0]), int(v[1])) for k, v in table.items()}, base
    ref = _diffusers(Ref, folder)
    size = dict(height=300, width=500)
    theirs = ref(prompt="a cat", negative_prompt="", num_inference_steps=3, generator=torch.Generator().manual_seed(4),
                 output_type="pt", use_resolution_binning=True, **size).images
    got = ours("a cat", seed=4, num_inference_steps=3, output_type="pt", progress=False, use_resolution_binning=True,
               **size)
    assert got.shape == theirs.shape == (1, 3, 300, 500)
    torch.testing.assert_close(got, theirs, **TOL)
    with pytest.raises(ValueError, match="height=300 must be a positive multiple of 32"):
        ours("a cat", num_inference_steps=1, progress=False, **size)


def test_offline_run_from_a_warm_cache(folder, tmp_path):
    """HF_HUB_OFFLINE=1 with the repo in the Hugging Face cache: the CLI runs from the cache, no network."""
    import os
    import shutil
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--someone--tiny-sana" / "snapshots" / "0123abcd"
    shutil.copytree(folder, snapshot)
    (tmp_path / "hub" / "models--someone--tiny-sana" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-sana" / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-m", "sana_core.cli", "--model", "someone/tiny-sana", "--steps", "1",
                          "--height", "64", "--width", "64", "--dtype", "fp32", "--no_progress", "--output_dir",
                          str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "out" / "00000.png").exists()
