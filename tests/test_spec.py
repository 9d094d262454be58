"""One source for every model default (`sana_core.spec`): per variant, from the checkpoint's own files, and the
same for the API and the ComfyUI nodes (which read `model_spec` / `SANA` too; they cannot be imported here)."""
import json
from dataclasses import replace

import pytest
import torch

from sana_core.dit import VARIANTS, SanaDiT
from sana_core.pipeline import SanaPipeline
from sana_core.samplers import flow_sigmas
from sana_core.spec import LATENT_SCALE, SANA, SPRINT, model_spec
from sana_core.tiny import randomize_, write_tiny_pipeline

SIZE = dict(height=64, width=96)


@pytest.fixture(scope="module")
def sprint_folder(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("sprint"), seed=12, sprint=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("sana"), seed=11)


@pytest.fixture(scope="module")
def pipe(folder):
    return SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_has_its_defaults(variant):
    cfg = VARIANTS[variant]
    spec = model_spec(cfg)
    sprint = "sprint" in variant
    want = (2, "scm", 4.5) if sprint else (20, "flow_dpmpp_2m", 4.5)
    assert (spec.steps, spec.sampler, spec.guidance_scale) == want
    assert spec.shift == (1.0 if sprint else 6.0 if variant.endswith("4k") else 3.0)
    assert spec.size == {"sana-1.6b-2k": 2048, "sana-1.6b-4k": 4096}.get(variant, 1024)
    assert (spec.pag_scale, spec.pag_layers) == (3.0, (8,))  # diffusers' SanaPAGPipeline scale, NVlabs' block
    assert (spec.max_timesteps, spec.intermediate_timesteps) == (1.57080, 1.3)
    assert (spec.latent_scale, spec.latent_factor) == (0.41407, 32)


def test_the_checkpoint_files_say_the_shift_and_the_latent_scale(folder, tmp_path):
    cfg = VARIANTS["sana-1.6b"]
    assert model_spec(cfg, folder).shift == 3.0 and model_spec(cfg, folder / "transformer").shift == 3.0
    edited = tmp_path / "m"
    (edited / "scheduler").mkdir(parents=True)
    (edited / "vae").mkdir()
    (edited / "scheduler" / "scheduler_config.json").write_text(json.dumps({"flow_shift": 4.5}))
    (edited / "vae" / "config.json").write_text(json.dumps({"scaling_factor": 0.5}))
    spec = model_spec(cfg, edited / "transformer")
    assert (spec.shift, spec.latent_scale) == (4.5, 0.5)
    assert model_spec(cfg, edited, latent_scale=0.25).latent_scale == 0.25  # a loaded DC-AE's own wins
    assert model_spec(cfg, tmp_path / "lone.safetensors").shift == 3.0      # a single file says nothing
    (edited / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="scheduler_config.json: not valid JSON"):
        model_spec(cfg, edited)


def test_the_pipeline_reads_the_folders_shift(folder, tmp_path, monkeypatch):
    from sana_core import denoiser

    config = folder / "scheduler" / "scheduler_config.json"
    original = config.read_text()
    config.write_text(json.dumps({**json.loads(original), "flow_shift": 5.0}))
    try:
        pipe = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    finally:
        config.write_text(original)
    assert pipe.spec.shift == 5.0 and pipe.spec.latent_scale == pipe.vae.cfg.scaling_factor
    seen = []
    real = denoiser.denoise_sigmas
    monkeypatch.setattr(denoiser, "denoise_sigmas", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    pipe("a cat", num_inference_steps=3, output_type="latent", progress=False, seed=0, **SIZE)
    torch.testing.assert_close(seen[0], flow_sigmas(3, 5.0))


def test_one_shift_per_model_whatever_the_size(pipe, monkeypatch):
    """The engine picks the shift by model, as ComfyUI's model sampling (`nodes/model.py` reads `model_spec`):
    a 4K model sampled small keeps 6.0, a 1024 px model sampled large keeps 3.0."""
    from sana_core import denoiser

    seen = []
    real = denoiser.denoise_sigmas
    monkeypatch.setattr(denoiser, "denoise_sigmas", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    four_k = replace(pipe.dit.cfg, use_pe=True, pe_interpolation=2.0, base_size=128)
    big = SanaPipeline(randomize_(SanaDiT(four_k), 3), pipe.vae, pipe.text_encoder, device="cpu")
    assert big.spec.shift == 6.0 and big.spec.size == 4096
    for p, shift in ((big, 6.0), (pipe, 3.0)):
        for size in (dict(height=64, width=64), dict(height=128, width=192)):
            seen.clear()
            p("a cat", num_inference_steps=2, output_type="latent", progress=False, seed=0, **size)
            torch.testing.assert_close(seen[0], flow_sigmas(2, shift))


def test_pipe_prompt_on_sprint_is_diffusers_default_call(sprint_folder):
    """`pipe(prompt)` with nothing else set equals SanaSprintPipeline's default call (2 SCM steps, guidance 4.5,
    its SCM times, 1024 x 1024)."""
    from diffusers import SanaSprintPipeline

    ref = SanaSprintPipeline.from_pretrained(sprint_folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    want = ref("a red fox", generator=torch.Generator().manual_seed(3), output_type="latent").images
    ours = SanaPipeline.from_pretrained(sprint_folder, torch_dtype=torch.float32, device="cpu")
    assert (ours.spec.steps, ours.spec.sampler, ours.spec.size) == (SPRINT.steps, "scm", 1024)
    got = ours("a red fox", seed=3, output_type="latent", progress=False)
    assert got.shape == (1, 32, 32, 32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)


def test_defaults_are_the_specs(pipe, monkeypatch):
    """The API's unset settings are the spec's (steps, sampler, CFG, PAG layers); PAG is off unless asked."""
    from sana_core import denoiser

    calls = {}
    real_sample, real_init = denoiser.sample, denoiser.SanaDenoiser.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        calls["denoiser"] = self

    monkeypatch.setattr(denoiser.SanaDenoiser, "__init__", init)
    import sana_core.pipeline as P

    monkeypatch.setattr(P, "sample", lambda d, noise, sampler, steps, shift, **k: calls.update(
        sampler=sampler, steps=steps, shift=shift) or real_sample(d, noise, sampler, 1, shift, **k))
    pipe("a cat", output_type="latent", progress=False, seed=0, **SIZE)
    d = calls["denoiser"]
    assert (calls["sampler"], calls["steps"], calls["shift"]) == (SANA.sampler, SANA.steps, SANA.shift)
    assert (d.guidance_scale, d.pag_scale, d.pag_layers, d.truncate_timesteps) == (4.5, 0.0, (8,), True)
    assert LATENT_SCALE == pipe.vae.cfg.scaling_factor


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_api_cli_and_nodes_pick_the_same_defaults(variant):
    """For every variant, what the CLI fills in (`cli.resolve_defaults`) is what the API resolves
    (`SanaPipeline._settings`): size, steps, sampler, shift, CFG, PAG; the nodes take the shift from the same
    `model_spec` and their widget defaults from `SANA` (ComfyUI widgets cannot depend on the model: Sprint's steps
    are set in its workflow)."""
    from types import SimpleNamespace

    from sana_core import cli

    cfg = VARIANTS[variant]
    model = SimpleNamespace(spec=model_spec(cfg), dit=SimpleNamespace(cfg=cfg))
    args = cli.build_parser().parse_args(["--prompt", "a cat"])
    jobs = cli.plan_jobs(cli.plan_images(cli.read_prompts(args), args), args)
    cli.resolve_defaults(jobs, model)
    got = jobs[0][0]
    unset = dict.fromkeys(("height", "width", "steps", "guidance", "pag_layers", "seed", "sampler", "shift",
                           "truncate", "max_timesteps", "intermediate_timesteps", "strength", "image", "mask",
                           "latents", "chi"))
    api = SanaPipeline._settings(model, ["a cat"], [""], **unset, pag_scale=0.0, use_chi=True, per_prompt=1,
                                 binning=False, output_type="pil")
    assert (got["height"], got["width"], got["steps"], got["sampler"], got["flow_shift"], got["guidance_scale"],
            got["pag_scale"], tuple(got["pag_layers"])) == (
        api.height, api.width, api.num_inference_steps, api.sampler, api.shift, api.guidance_scale, api.pag_scale,
        api.pag_layers)
    assert api.shift == model_spec(cfg).shift  # the nodes' model sampling (load_sana_model)
    if "sprint" not in variant:  # SanaSampler / SanaScheduler / SanaPAG widget defaults
        assert (SANA.steps, SANA.guidance_scale, SANA.pag_layers) == (api.num_inference_steps, api.guidance_scale,
                                                                      api.pag_layers)
