"""ControlNet generations: diffusers' SanaControlNetPipeline on the same tiny weights (diffusers order), and the
NVlabs release layout through the API (combined .pth used as DiT and ControlNet, step ranges, strengths)."""
import numpy as np
import pytest
import torch
from PIL import Image

from sana_core.pipeline import SanaPipeline
from sana_core.tiny import randomize_, write_tiny_controlnet, write_tiny_pipeline

PROMPTS = ["a cat sleeping on a sunny windowsill", "portrait of an old man"]
SIZE = dict(height=128, width=192)
TOL = dict(rtol=1e-4, atol=5e-5)  # as the other whole-generation parity tests


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("sana8"), seed=21, depth=8)


@pytest.fixture(scope="module")
def scribble():
    """White strokes on black, 192 x 128: a ready control image."""
    a = np.zeros((128, 192, 3), np.uint8)
    a[20:26, 10:180] = 255
    a[30:120, 90:96] = 255
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def release(folder, tmp_path_factory):
    return write_tiny_controlnet(tmp_path_factory.mktemp("nv") / "Sana_600M_1024px_ControlNet_HED.pth",
                                 folder / "transformer", seed=22)


@pytest.fixture(scope="module")
def plain(folder):
    return SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def controlled(folder, release):
    return SanaPipeline.from_pretrained(folder, controlnet=release, torch_dtype=torch.float32, device="cpu")


def test_matches_sana_controlnet_pipeline(folder, scribble, tmp_path):
    from diffusers import SanaControlNetModel, SanaControlNetPipeline

    from sana_core.dit import SanaDiT
    cfg = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu").dit.cfg
    assert isinstance(cfg, type(SanaDiT(cfg).cfg)) and cfg.depth == 8
    net = randomize_(SanaControlNetModel(
        num_attention_heads=cfg.self_heads, attention_head_dim=cfg.self_head_dim, num_layers=7,
        num_cross_attention_heads=cfg.cross_heads, cross_attention_head_dim=cfg.width // cfg.cross_heads,
        cross_attention_dim=cfg.width, caption_channels=cfg.caption_channels, mlp_ratio=cfg.mlp_ratio), 23)
    net.save_pretrained(tmp_path / "controlnet")
    ref = SanaControlNetPipeline.from_pretrained(folder, controlnet=net.eval(), torch_dtype=torch.float32)
    ours = SanaPipeline.from_pretrained(folder, controlnet=tmp_path / "controlnet", torch_dtype=torch.float32,
                                        device="cpu")
    assert ours.controlnets[0].order == "diffusers"
    kw = dict(num_inference_steps=20, guidance_scale=4.5, **SIZE)
    for output_type in ("latent", "pt"):
        want = ref(PROMPTS, negative_prompt="", control_image=scribble, controlnet_conditioning_scale=0.7,
                   generator=torch.Generator().manual_seed(5), output_type=output_type,
                   use_resolution_binning=False, **kw).images
        got = ours(PROMPTS, control_image=scribble, controlnet_conditioning_scale=0.7, seed=5,
                   output_type=output_type, progress=False, **kw)
        torch.testing.assert_close(got, want, **TOL)
    base = ours.__class__(ours.dit, ours.vae, ours.text_encoder, device="cpu")(PROMPTS, seed=5, output_type="pt",
                                                                                progress=False, **kw)
    assert (got - base).abs().max() > 0.02  # the ControlNet acts


def test_release_file_is_the_dit_and_the_controlnet_read_once(folder, release, controlled, plain, scribble):
    from sana_core.checkpoints.files import read_keys
    both = SanaPipeline.from_pretrained(folder, dit=release, controlnet=release, torch_dtype=torch.float32,
                                        device="cpu")
    params = sum(1 for _ in both.dit.parameters()) + sum(1 for _ in both.controlnets[0].parameters())
    assert params == len(read_keys(release))  # every tensor of the file once, none twice
    assert both.controlnets[0].order == "nvlabs"
    kw = dict(num_inference_steps=6, seed=3, output_type="pt", progress=False, **SIZE)
    a = both(PROMPTS[0], control_image=scribble, **kw)
    b = controlled(PROMPTS[0], control_image=scribble, **kw)
    assert torch.equal(a, b)
    assert (a - plain(PROMPTS[0], **kw)).abs().max() > 0.02


def test_strength_and_step_range(controlled, plain, scribble):
    kw = dict(num_inference_steps=6, seed=4, output_type="latent", progress=False, **SIZE)
    base = plain(PROMPTS, pag_scale=1.5, pag_applied_layers=[3], **kw)
    run = lambda **c: controlled(PROMPTS, control_image=scribble, pag_scale=1.5, pag_applied_layers=[3], **c, **kw)
    full = run()
    assert torch.equal(run(controlnet_conditioning_scale=0.0), base)
    assert torch.equal(run(control_guidance_end=0.0), base)          # acts on no step
    late, early = run(control_guidance_start=0.5), run(control_guidance_end=0.5)
    for part in (late, early):
        assert (part - base).abs().max() > 1e-3 and (part - full).abs().max() > 1e-3
    half = run(controlnet_conditioning_scale=0.5)
    assert (half - base).abs().max() > 1e-3 and (half - full).abs().max() > 1e-3


def test_two_controlnets_add_up(folder, release, controlled, scribble):
    twice = SanaPipeline.from_pretrained(folder, controlnet=[release, release], torch_dtype=torch.float32, device="cpu")
    kw = dict(num_inference_steps=4, seed=6, output_type="latent", progress=False, **SIZE)
    one = controlled(PROMPTS[0], control_image=scribble, **kw)
    two = twice(PROMPTS[0], control_image=[scribble, scribble], controlnet_conditioning_scale=[0.5, 0.5], **kw)
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-5)


def test_control_image_is_resized_and_cropped(controlled, scribble):
    """Any size: resized (bicubic) to cover and centre-cropped; a tensor, a path and a PIL image agree."""
    from sana_core.images import load_image

    big = scribble.resize((384, 384))
    px = load_image(big, height=128, width=192)
    assert px.shape == (1, 3, 128, 192) and 0 <= px.min() and px.max() <= 1
    t = torch.from_numpy(np.asarray(big, np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(load_image(t, height=128, width=192), px)


def test_bad_control_inputs(controlled, plain, scribble, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    kw = dict(num_inference_steps=2, seed=1, progress=False, **SIZE)
    with pytest.raises(ValueError, match="notes.txt.*not a readable image"):
        controlled(PROMPTS[0], control_image=text, **kw)
    with pytest.raises(ValueError, match="control_image: expected a PIL image.*got a tensor of shape \\(4, 4\\)"):
        controlled(PROMPTS[0], control_image=torch.zeros(4, 4), **kw)
    with pytest.raises(ValueError, match="give control_image"):
        controlled(PROMPTS[0], **kw)
    with pytest.raises(ValueError, match="control_image act on a ControlNet, and this pipeline has none"):
        plain(PROMPTS[0], control_image=scribble, **kw)
    with pytest.raises(ValueError, match="control_guidance_end act on a ControlNet"):
        plain(PROMPTS[0], control_guidance_end=0.5, **kw)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale: 2 values for 1 ControlNets"):
        controlled(PROMPTS[0], control_image=scribble, controlnet_conditioning_scale=[1, 1], **kw)
    with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
        controlled(PROMPTS[0], control_image=scribble, control_guidance_start=0.8, control_guidance_end=0.2, **kw)


def _cli(capsys, *args):
    from sana_core.cli import main
    code = main([*args, "--dtype", "fp32", "--no_progress", "--steps", "4", "--height", "128", "--width", "192"])
    out = capsys.readouterr()
    return code, out.out.split(), out.err


def test_cli_controlnet_equals_pipe(folder, release, controlled, scribble, tmp_path, capsys):
    import json
    hint = tmp_path / "scribble.png"
    scribble.resize((300, 260)).save(hint)  # any size: resized and cropped
    code, paths, err = _cli(capsys, "--model", str(folder), "--controlnet", str(release), "--control_image", str(hint),
                            "--control_scale", "0.8", "--control_end", "0.5", "--prompt", PROMPTS[0], "--seed", "9",
                            "--output_dir", str(tmp_path / "out"))
    assert code == 0, err
    want = controlled(PROMPTS[0], control_image=hint, controlnet_conditioning_scale=0.8, control_guidance_end=0.5,
                      seed=9, num_inference_steps=4, progress=False, **SIZE)[0]
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(want))
    meta = json.loads(Image.open(paths[0]).text["sana"])
    assert meta["control_image"] == [str(hint)] and meta["control_scale"] == [0.8] and meta["control_end"] == 0.5
    # json records bring their own control image (relative to the json file) and start image
    other = tmp_path / "lines.png"
    scribble.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    spec = tmp_path / "prompts.json"
    spec.write_text(json.dumps({"a": {"prompt": PROMPTS[0], "seed": 9, "control_image": "lines.png"},
                                "b": {"prompt": PROMPTS[0], "seed": 9, "image": "lines.png"}}))
    code, paths, err = _cli(capsys, "--model", str(folder), "--controlnet", str(release), "--control_image", str(hint),
                            "--json_file", str(spec), "--output_dir", str(tmp_path / "rec"))
    assert code == 0, err
    want = controlled(PROMPTS[0], control_image=other, seed=9, num_inference_steps=4, progress=False, **SIZE)[0]
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(want))
    assert json.loads(Image.open(paths[1]).text["sana"])["image"] == str(other)


@pytest.mark.parametrize("flags,match", [
    (["--control_image", "{hint}"], "0 --controlnet"),
    (["--control_scale", "0.5"], "--control_scale / --control_start / --control_end act on a ControlNet"),
    (["--control_end", "0.5"], "--control_scale / --control_start / --control_end act on a ControlNet"),
    (["--controlnet", "{release}"], "--control_image: 0 control images for 1 --controlnet"),
    (["--controlnet", "{release}", "--control_image", "{hint}", "--control_scale", "1", "--control_scale", "2"],
     "--control_scale: 2 values for 1 --controlnet"),
    (["--controlnet", "{release}", "--control_image", "missing.png"], "missing.png: no such file"),
    (["--controlnet", "{release}", "--control_image", "{hint}", "--control_start", "0.9", "--control_end", "0.1"],
     "--control_start 0.9 is after --control_end 0.1"),
])
def test_cli_bad_controlnet_flags(folder, release, scribble, tmp_path, capsys, flags, match):
    hint = tmp_path / "h.png"
    scribble.save(hint)
    flags = [f.format(hint=hint, release=release) for f in flags]
    code, _, err = _cli(capsys, "--model", str(folder), *flags, "--output_dir", str(tmp_path))
    assert code == 2 and match in err
