"""The command line: prompt files, PNG metadata, batching that does not change images, clear errors."""
import json

import numpy as np
import pytest
from PIL import Image

from sana_core.cli import main
from sana_core.tiny import write_tiny_pipeline

SMALL = ["--height", "64", "--width", "96", "--steps", "2", "--dtype", "fp32", "--no_progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(write_tiny_pipeline(tmp_path_factory.mktemp("sana"), seed=4))


def run(capsys, *args):
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own errors (flag values)
        code = e.code
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def test_txt_file_batches_and_metadata(folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\n# a comment\nan old lighthouse\na bowl of ramen\n")
    code, paths, _ = run(capsys, "--model", folder, "--txt_file", str(prompts), "--batch_size", "2",
                         "--seed", "10", "--output_dir", str(tmp_path / "out"), *SMALL)
    assert code == 0 and len(paths) == 3
    meta = [json.loads(Image.open(p).text["sana"]) for p in paths]
    assert [m["prompt"] for m in meta] == ["a red fox", "an old lighthouse", "a bowl of ramen"]
    assert [m["seed"] for m in meta] == [10, 11, 12]
    assert Image.open(paths[1]).text["prompt"] == "an old lighthouse"
    assert Image.open(paths[0]).size == (96, 64)
    # the second image alone, with its seed, is the same image: batching does not change results
    code, alone, _ = run(capsys, "--model", folder, "--prompt", "an old lighthouse", "--seed", "11",
                         "--output_dir", str(tmp_path / "alone"), *SMALL)
    _same_across_batches([_png(paths[1])], [_png(alone[0])])


def test_json_records_with_overrides(folder, tmp_path, capsys):
    spec = tmp_path / "prompts.json"
    spec.write_text(json.dumps({"fox": "a red fox", "tall": {"prompt": "a tower", "height": 128, "seed": 3}}))
    code, paths, _ = run(capsys, "--model", folder, "--json_file", str(spec), "--output_dir", str(tmp_path), *SMALL)
    assert code == 0
    assert [p.rsplit("/", 1)[1] for p in paths] == ["fox.png", "tall.png"]
    assert Image.open(paths[1]).size == (96, 128)
    assert json.loads(Image.open(paths[1]).text["sana"])["seed"] == 3


def test_existing_files_are_not_overwritten(folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.png").write_bytes(b"precious")
    code, paths, _ = run(capsys, "--model", folder, "--output_dir", str(out), *SMALL)
    assert code == 0 and paths[0].endswith("00000_1.png")
    assert (out / "00000.png").read_bytes() == b"precious"


@pytest.mark.parametrize("name,content,match", [
    ("p.txt", "\n# only a comment\n", "holds no prompts"),
    ("p.json", "[1, 2]", "entry 0 must be a prompt string"),
    ("p.json", '[{"prompt": "x", "steps": 0}]', "entry 0: \"steps\" must be at least 1, got 0"),
    ("p.json", '[{"prompt": "x", "guidance_scale": NaN}]', "\"guidance_scale\" expected a finite number"),
    ("p.json", '[{"prompt": "x", "steps": 2.5}]', "\"steps\" expected an integer, got 2.5"),
    ("p.json", "{not json", "not valid JSON"),
    ("p.json", "[]", "holds no prompts"),
])
def test_bad_prompt_files(tmp_path, capsys, name, content, match):
    f = tmp_path / name
    f.write_text(content)
    flag = "--txt_file" if name.endswith(".txt") else "--json_file"
    code, _, err = run(capsys, "--model", str(tmp_path / "missing"), flag, str(f))
    assert code == 2 and match in err and name in err
    assert len(err.strip().splitlines()) == 1, err


def test_size_is_checked_before_loading(tmp_path, capsys):
    code, _, err = run(capsys, "--model", str(tmp_path / "missing"), "--height", "1000")
    assert code == 2 and "--height 1000 must be a positive multiple of 32" in err and "992 or 1024" in err


def test_missing_model_and_unknown_sampler(tmp_path, capsys):
    code, _, err = run(capsys, "--model", "./nowhere/at_all")
    assert code == 2 and "nowhere/at_all" in err
    code, _, err = run(capsys, "--sampler", "euler_a")
    assert code == 2 and "unknown sampler 'euler_a'; valid: flow_dpmpp_2m, flow_euler, scm" in err
    code, _, err = run(capsys, "--sampling_algo", "sa-solver")
    assert code == 2 and "'sa-solver' is NVlabs' sampler for diffusion (non-flow) models" in err


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def _same_across_batches(a: list, b: list) -> None:
    """Images of the same seeds and prompts made in batches of different sizes are the same image: within one
    level (1/255) on a few pixels, since CPU kernels round otherwise in other batch shapes (~1e-6 in the DiT)."""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        diff = np.abs(x - y)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (i, int(diff.max()), int((diff > 0).sum()))


def _pipe_png(pipe, prompt: str, seed: int, **kw) -> np.ndarray:
    image = pipe(prompt, seed=seed, height=64, width=96, progress=False, output_type="pt", **kw)[0]
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.int16)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sprint_from_the_cli_equals_pipe_and_diffusers(sprint_folder, tmp_path, capsys, steps):
    """Each CLI image = pipe(prompt, seed=s) = diffusers' SanaSprintPipeline with generator=manual_seed(s), for
    every prompt of a file, whatever the batch size (the SCM re-noising continues each image's own generator)."""
    import torch
    from diffusers import SanaSprintPipeline

    from sana_core.pipeline import SanaPipeline

    folder = sprint_folder
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\nan old lighthouse\na bowl of ramen\n")
    runs = {}
    for batch in ("1", "3"):
        code, paths, _ = run(capsys, "--model", folder, "--txt_file", str(prompts), "--seed", "3", "--steps",
                             str(steps), "--batch_size", batch, "--output_dir", str(tmp_path / batch), *SMALL[:4],
                             "--dtype", "fp32", "--no_progress")
        assert code == 0
        runs[batch] = [_png(p) for p in paths]
    _same_across_batches(runs["1"], runs["3"])
    pipe = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    ref = SanaSprintPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    for i, prompt in enumerate(["a fox", "an old lighthouse", "a bowl of ramen"]):
        assert np.abs(runs["1"][i] - _pipe_png(pipe, prompt, 3 + i, num_inference_steps=steps)).max() <= 1
        theirs = ref(prompt, num_inference_steps=steps, height=64, width=96, output_type="np",
                     generator=torch.Generator().manual_seed(3 + i), use_resolution_binning=False,
                     intermediate_timesteps=1.3 if steps == 2 else None).images[0]
        assert np.abs(runs["1"][i] - (theirs * 255).round().astype(np.int16)).max() <= 1, i


@pytest.mark.parametrize("mode", ["sana", "pag", "img2img"])
def test_cli_images_equal_pipe_with_their_seeds(folder, tmp_path, capsys, mode):
    """The same for Sana, PAG and image-to-image: batch 1 and 2 give the same images, each = pipe(seed=s)."""
    import torch

    from sana_core.images import load_image
    from sana_core.pipeline import SanaPipeline

    flags, kw = [], {}
    if mode == "pag":
        flags, kw = ["--pag_guidance_scale", "2", "--pag_layers", "1"], {"pag_scale": 2.0, "pag_applied_layers": (1,)}
    elif mode == "img2img":
        rng = np.random.default_rng(1)
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "in.png")
        flags = ["--image", str(tmp_path / "in.png"), "--strength", "0.6"]
        kw = {"image": load_image(tmp_path / "in.png", height=64, width=96), "strength": 0.6}
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\nan old lighthouse\n")
    runs = {}
    for batch in ("1", "2"):
        code, paths, _ = run(capsys, "--model", folder, "--txt_file", str(prompts), "--seed", "8", "--batch_size",
                             batch, "--output_dir", str(tmp_path / batch), *SMALL, *flags)
        assert code == 0
        runs[batch] = [_png(p) for p in paths]
    _same_across_batches(runs["1"], runs["2"])
    pipe = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    for i, prompt in enumerate(["a red fox", "an old lighthouse"]):
        assert np.abs(runs["1"][i] - _pipe_png(pipe, prompt, 8 + i, num_inference_steps=2, **kw)).max() <= 1


@pytest.fixture(scope="module")
def sprint_folder(tmp_path_factory):
    return str(write_tiny_pipeline(tmp_path_factory.mktemp("sprint"), seed=5, sprint=True))


@pytest.mark.parametrize("mode", ["sana", "sprint", "pag"])
def test_batch_size_gives_the_same_pngs(folder, sprint_folder, tmp_path, capsys, mode):
    """--batch_size 1 and 4 write the same images (`_same_across_batches`) for prompts of different lengths
    (Sana's default sampler, Sprint in 2 steps, PAG): each image depends on its seed and prompt only (each
    prompt encoded alone, the DiT attending to each caption's own real tokens, not a batch's padding)."""
    model, flags = (sprint_folder, ["--steps", "2"]) if mode == "sprint" else (folder, ["--steps", "3"])
    if mode == "pag":
        flags += ["--pag_guidance_scale", "2", "--pag_layers", "1"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\nan old lighthouse on a rocky cliff at sunset, dramatic clouds, oil painting\n"
                       "a bowl of ramen\nportrait of an old man with a white beard\n")
    runs = {}
    for batch in ("1", "4"):
        code, paths, _ = run(capsys, "--model", model, "--txt_file", str(prompts), "--seed", "3", "--batch_size",
                             batch, "--height", "256", "--width", "256", "--dtype", "fp32", "--no_progress",
                             "--output_dir", str(tmp_path / batch), *flags)
        assert code == 0 and len(paths) == 4
        runs[batch] = [_png(p) for p in paths]
    _same_across_batches(runs["1"], runs["4"])


def test_images_per_prompt_slicing_sharding_and_resume(folder, tmp_path, capsys, monkeypatch):
    """--num_images_per_prompt names and seeds every image by its place in the file; --start_index/--end_index
    slice the prompts; RANK/WORLD_SIZE (torchrun, accelerate) split the images between processes, which write
    exactly the single-process files; --skip_existing resumes an interrupted run."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\nan old lighthouse\na bowl of ramen\n")
    common = ["--model", folder, "--txt_file", str(prompts), "--num_images_per_prompt", "2", *SMALL]
    code, whole, _ = run(capsys, *common, "--output_dir", str(tmp_path / "one"))
    names = [p.rsplit("/", 1)[1] for p in whole]
    assert code == 0 and names == [f"{i:05d}_{k}.png" for i in range(3) for k in range(2)]
    assert [json.loads(Image.open(p).text["sana"])["seed"] for p in whole] == list(range(6))
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert run(capsys, *common, "--output_dir", str(tmp_path / "two"))[0] == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    for name, path in zip(names, whole):
        assert np.array_equal(_png(tmp_path / "two" / name), _png(path)), name
    code, part, _ = run(capsys, *common, "--start_index", "1", "--end_index", "2", "--output_dir", str(tmp_path / "s"))
    assert [p.rsplit("/", 1)[1] for p in part] == ["00001_0.png", "00001_1.png"]
    assert np.array_equal(_png(part[1]), _png(whole[3]))
    (tmp_path / "two" / names[4]).unlink()  # an interrupted run: one image missing
    code, resumed, _ = run(capsys, *common, "--skip_existing", "--output_dir", str(tmp_path / "two"))
    assert code == 0 and [p.rsplit("/", 1)[1] for p in resumed] == [names[4]]
    assert np.array_equal(_png(resumed[0]), _png(whole[4]))


def test_two_processes_under_torchrun(folder, tmp_path):
    """torchrun --nproc_per_node 2 (CPU) writes the files of a single-process run, pixel for pixel (with the one
    CPU thread per process torchrun sets for both: CPU kernels split sums by thread count)."""
    import os
    import subprocess
    import sys

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(4)))
    common = ["-m", "sana_core.cli", "--model", folder, "--txt_file", str(prompts), *SMALL]
    single = subprocess.run([sys.executable, *common, "--output_dir", str(tmp_path / "one")], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *common,
                          "--output_dir", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    one_files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one_files == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(one_files) == 4
    for name in one_files:
        assert np.array_equal(_png(tmp_path / "one" / name), _png(tmp_path / "two" / name)), name


@pytest.mark.parametrize("flags,match", [
    (["--variant", "fp8"], "variant='fp8': expected one of fp16, bf16"),
    (["--num_images_per_prompt", "0"], "argument --num_images_per_prompt: must be at least 1, got 0"),
    (["--strength", "0.5"], "--strength needs --image"),
    (["--strength", "1.5", "--image", "x.png"], "argument --strength: must be in (0, 1], got 1.5"),
])
def test_bad_flags_are_named(folder, capsys, flags, match):
    code, _, err = run(capsys, "--model", folder, *flags, *SMALL)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_lora_flag_and_a_lora_for_another_model(folder, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 64, generator=g),
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(64, 4, generator=g)},
              str(tmp_path / "lora.safetensors"))
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4)},
              str(tmp_path / "sdxl_lora.safetensors"))
    images = []
    for scale in ("0", "1.5"):
        code, paths, _ = run(capsys, "--model", folder, "--lora", f"{tmp_path / 'lora.safetensors'}:{scale}",
                             "--output_dir", str(tmp_path / scale), *SMALL)
        assert code == 0
        images.append(_png(paths[0]))
    plain = _png(run(capsys, "--model", folder, "--output_dir", str(tmp_path / "plain"), *SMALL)[1][0])
    assert np.array_equal(images[0], plain) and np.abs(images[1] - plain).max() > 5
    code, _, err = run(capsys, "--model", folder, "--lora", str(tmp_path / "sdxl_lora.safetensors"), *SMALL)
    assert code == 2 and "sdxl_lora.safetensors" in err and "a LoRA for another model" in err


def test_inpainting_from_the_command_line(folder, tmp_path, capsys):
    """--image --mask: the saved image equals pipe(..., image=, mask_image=) on the same resized files;
    --mask without --image is a clear error."""
    import torch

    from sana_core.images import load_image, load_mask
    from sana_core.pipeline import SanaPipeline

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    mask = np.zeros((80, 120), np.uint8)
    mask[20:60, 30:90] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, paths, _ = run(capsys, "--model", folder, "--prompt", "a red fox", "--image", str(tmp_path / "photo.png"),
                         "--mask", str(tmp_path / "mask.png"), "--seed", "5", "--output_dir", str(tmp_path / "o"),
                         *SMALL)
    assert code == 0 and len(paths) == 1
    meta = json.loads(Image.open(paths[0]).text["sana"])
    assert meta["strength"] == 1.0 and meta["mask"].endswith("mask.png")
    pipe = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    want = pipe("a red fox", image=load_image(tmp_path / "photo.png", height=64, width=96),
                mask_image=load_mask(tmp_path / "mask.png", height=64, width=96), strength=1.0, seed=5, height=64,
                width=96, num_inference_steps=2, progress=False)[0]
    assert np.abs(np.asarray(Image.open(paths[0]), np.int16) - np.asarray(want, np.int16)).max() <= 1
    code, _, err = run(capsys, "--model", folder, "--mask", str(tmp_path / "mask.png"), *SMALL)
    assert code == 2 and "--mask needs --image" in err


def test_resolution_binning_flag(folder, tmp_path, capsys):
    """Any size with --resolution_binning; also: --dtype auto (the default) is fp32 on the CPU, as the trainer's."""
    code, paths, _ = run(capsys, "--model", folder, "--height", "100", "--width", "150", "--resolution_binning",
                         "--steps", "1", "--no_progress", "--output_dir", str(tmp_path))
    assert code == 0 and Image.open(paths[0]).size == (150, 100)
    meta = json.loads(Image.open(paths[0]).text["sana"])
    assert meta["resolution_binning"] is True and meta["dtype"] == "fp32"


# ------------------------------------------------------------------------------ issue 23: one line per mistake


def _corrupt_png(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return str(path)


@pytest.mark.parametrize("flags,match", [
    (["--steps", "0"], "argument --steps/--num_inference_steps/--step: must be at least 1, got 0"),
    (["--guidance_scale", "nan"], "argument --guidance_scale/--cfg_scale: expected a finite number, got 'nan'"),
    (["--pag_scale", "nan"], "argument --pag_scale: expected a finite number, got 'nan'"),
    (["--pag_guidance_scale", "inf"], "argument --pag_guidance_scale: expected a finite number, got 'inf'"),
    (["--pag_layers", "-1"], "block indices start at 0, got -1"),
    (["--gudiance_scale", "3"], "unrecognized arguments: --gudiance_scale 3 (did you mean --guidance_scale?)"),
    (["--prompt", "a", "--txt_file", "p.txt"], "give one of --prompt, --txt_file, --json_file"),
    (["--image", "{tmp}/missing.png"], "--image {tmp}/missing.png: no such file"),
    (["--image", "{tmp}/corrupt.png"], "--image {tmp}/corrupt.png: not a readable image"),
    (["--image", "{tmp}/ok.png", "--mask", "{tmp}/corrupt.png"], "--mask {tmp}/corrupt.png: not a readable image"),
    (["--txt_file", "{tmp}/latin1.txt"], "--txt_file {tmp}/latin1.txt: not UTF-8 text"),
    (["--txt_file", "{tmp}/nowhere.txt"], "--txt_file {tmp}/nowhere.txt: no such file"),
    (["--lora", "{tmp}/gone.safetensors:0.8"], "--lora {tmp}/gone.safetensors: no such file or folder"),
    (["--vae", "./no_dcae"], "--vae ./no_dcae: no such file or folder, and not a Hugging Face repo id"),
    ([], "--model {tmp}/no_model: no such file or folder"),
])
def test_mistakes_are_one_line_before_loading(tmp_path, capsys, flags, match):
    """Each mistake: exit code 2 and one line naming the flag and what was expected, before any model is loaded
    (the model path does not exist)."""
    _corrupt_png(tmp_path / "corrupt.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "latin1.txt").write_bytes("un caf\xe9\n".encode("latin-1"))
    flags = [f.format(tmp=tmp_path) for f in flags]
    code, _, err = run(capsys, "--model", str(tmp_path / "no_model"), *flags)
    assert code == 2 and match.format(tmp=tmp_path) in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_mistakes_only_the_model_can_tell(folder, sprint_folder, tmp_path, capsys, caplog):
    """--pag_layers beyond the loaded model's depth: one line, rc 2. Sprint's --negative_prompt: a warning, and not
    in the PNG metadata. --pag_layers without a PAG scale, --flow_shift on the scm sampler: warnings."""
    code, _, err = run(capsys, "--model", folder, "--pag_scale", "2", *SMALL)  # default block 8, tiny depth 2
    assert code == 2 and err.strip() == "error: --pag_layers 8: this model has 2 blocks (0..1)"
    code, paths, _ = run(capsys, "--model", sprint_folder, "--negative_prompt", "blurry", "--pag_layers", "1",
                         "--flow_shift", "2", "--output_dir", str(tmp_path), *SMALL)
    assert code == 0
    assert "--negative_prompt is not used: Sana-Sprint has no classifier-free guidance" in caplog.text
    assert "--flow_shift is not used by the scm sampler" in caplog.text
    assert "--pag_layers is not used: PAG is off without --pag_scale > 0" in caplog.text
    meta = json.loads(Image.open(paths[0]).text["sana"])
    assert meta["negative_prompt"] == "" and meta["sampler"] == "scm" and meta["steps"] == 2


def test_nvlabs_and_old_spellings_are_honoured(folder, tmp_path, capsys, caplog):
    """NVlabs' flags and sampler names and our old spellings reach the image: the PNG metadata (written under
    the option names) holds the values, the old spellings warn once, and the images equal the canonical
    flags' (within a level: another batch size)."""
    nvlabs = ["--cfg_scale", "3", "--bs", "2", "--step", "2", "--sampling_algo", "flow_dpm-solver", "--pag_scale",
              "1.5", "--pag_applied_layers", "1", "--work_dir", str(tmp_path / "nv")]
    old = ["--shift", "2.5", "--no-truncate_timesteps"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\nan old lighthouse\n")
    common = ["--model", folder, "--txt_file", str(prompts), "--height", "64", "--width", "96", "--dtype", "fp32",
              "--no_progress"]
    code, paths, _ = run(capsys, *common, *nvlabs, *old)
    assert code == 0 and all(p.startswith(str(tmp_path / "nv")) for p in paths)
    meta = json.loads(Image.open(paths[1]).text["sana"])
    assert {k: meta[k] for k in ("guidance_scale", "steps", "sampler", "pag_scale", "pag_layers", "flow_shift",
                                 "truncate_timesteps", "seed")} == {
        "guidance_scale": 3.0, "steps": 2, "sampler": "flow_dpmpp_2m", "pag_scale": 1.5, "pag_layers": [1],
        "flow_shift": 2.5, "truncate_timesteps": False, "seed": 1}
    assert "--shift is deprecated: use --flow_shift" in caplog.text
    assert "--no-truncate_timesteps is deprecated: use --no_truncate_timesteps" in caplog.text
    code, ours, _ = run(capsys, *common, "--guidance_scale", "3", "--steps", "2", "--pag_scale", "1.5",
                        "--pag_layers", "1", "--flow_shift", "2.5", "--no_truncate_timesteps",
                        "--output_dir", str(tmp_path / "ours"))
    assert code == 0
    _same_across_batches([_png(a) for a in paths], [_png(b) for b in ours])  # --bs 2 against batch 1
    help_text = build_help()
    for flag in ("--cfg_scale", "--bs", "--step", "--sampling_algo", "--model_path", "--work_dir",
                 "--pag_applied_layers", "--num_inference_steps", "flow_dpm-solver"):
        assert flag in help_text, flag


def build_help() -> str:
    from sana_core.cli import build_parser

    return build_parser().format_help()


def test_json_extra_fields_and_names_by_prompt(folder, tmp_path, capsys, caplog):
    """A benchmark file's extra fields are ignored with one warning naming them; --name_by prompt names files
    after their (file-safe) prompt as NVlabs does, repeats numbered; records' values checked and used."""
    spec = tmp_path / "bench.json"
    spec.write_text(json.dumps([
        {"prompt": "a red fox", "category": "animals", "tag": 1},
        {"prompt": "a/b: c?", "category": "odd", "cfg_scale": 2},
        {"prompt": "a red fox", "category": "animals"}]))
    code, paths, _ = run(capsys, "--model", folder, "--json_file", str(spec), "--name_by", "prompt",
                         "--output_dir", str(tmp_path / "o"), *SMALL)
    assert code == 0
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a red fox.png", "a_b_ c_.png", "a red fox_1.png"]
    warnings = [r.getMessage() for r in caplog.records if "ignoring fields" in r.getMessage()]
    assert len(warnings) == 1 and "'category' (3 entries), 'tag' (1 entries)" in warnings[0]
    assert json.loads(Image.open(paths[1]).text["sana"])["guidance_scale"] == 2.0


def test_pip_install_and_entry_points_from_another_directory(tmp_path):
    """`pip install .` of the repository (flat layout: only sana_core is packaged) gives working `sana-generate`
    and `sana-train` commands outside the repository (no build isolation and no dependencies: the test venv has
    them; CI installs from nothing)."""
    import subprocess
    import sys
    from pathlib import Path

    import shutil

    root = tmp_path / "repo"  # a copy: pip builds in the source folder (build/, *.egg-info)
    shutil.copytree(Path(__file__).parents[1], root, ignore=shutil.ignore_patterns(
        ".*", "build", "*.egg-info", "__pycache__", "output", "tiny-sana"))
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(root)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "sana_core"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)}
    for command, words in (("sana-generate", "--cfg_scale"), ("sana-train", "--pretrained_model_name_or_path")):
        out = subprocess.run([str(target / "bin" / command), "--help"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, env=env)
        assert out.returncode == 0 and f"usage: {command}" in out.stdout and words in out.stdout, out.stderr[-2000:]


def test_sprint_img2img_strength_maps_to_diffusers(sprint_folder, tmp_path, capsys, n=4, strength=0.6):
    """Sprint image-to-image: our --strength is ComfyUI's denoise; diffusers' SanaSprintImg2ImgPipeline with
    num_inference_steps=N, strength=s runs the last k = N - int(N - N s) of N steps, which is our --steps k
    --strength k/N (as --help and the README say): the same image within 1/255 (N=4, s=0.6: k=3, 0.75;
    measured 0.007/255, and also for N=2, s=0.6, N=4, s=0.3 and N=3, s=0.8)."""
    import torch
    from diffusers import SanaSprintImg2ImgPipeline

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    k = n - int(n - n * strength)
    code, paths, _ = run(capsys, "--model", sprint_folder, "--prompt", "a fox", "--image", str(tmp_path / "in.png"),
                         "--steps", str(k), "--strength", str(k / n), "--seed", "3", "--height", "64", "--width", "96",
                         "--dtype", "fp32", "--no_progress", "--output_dir", str(tmp_path / "o"))
    assert code == 0
    ref = SanaSprintImg2ImgPipeline.from_pretrained(sprint_folder, torch_dtype=torch.float32)
    theirs = ref("a fox", image=Image.open(tmp_path / "in.png"), strength=strength, num_inference_steps=n, height=64,
                 width=96, output_type="np", generator=torch.Generator().manual_seed(3), use_resolution_binning=False,
                 intermediate_timesteps=1.3 if n == 2 else None).images[0]
    assert np.abs(_png(paths[0]) - (theirs * 255).round().astype(np.int16)).max() <= 1
