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
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out.split(), out.err


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
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (paths[1], alone[0]))
    assert np.abs(a - b).max() <= 1


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
    ("p.json", '[{"prompt": "x", "colour": 1}]', "unknown fields ['colour']"),
    ("p.json", "{not json", "not valid JSON"),
    ("p.json", "[]", "holds no prompts"),
])
def test_bad_prompt_files(tmp_path, capsys, name, content, match):
    f = tmp_path / name
    f.write_text(content)
    flag = "--txt_file" if name.endswith(".txt") else "--json_file"
    code, _, err = run(capsys, "--model", str(tmp_path / "missing"), flag, str(f))
    assert code == 2 and match in err and name in err


def test_size_is_checked_before_loading(tmp_path, capsys):
    code, _, err = run(capsys, "--model", str(tmp_path / "missing"), "--height", "1000")
    assert code == 2 and "height=1000 must be a positive multiple of 32" in err and "992 or 1024" in err


def test_missing_model_and_unknown_sampler(tmp_path, capsys):
    code, _, err = run(capsys, "--model", "./nowhere/at_all")
    assert code == 2 and "nowhere/at_all" in err
    with pytest.raises(SystemExit):
        main(["--sampler", "euler_a"])
    assert "invalid choice: 'euler_a'" in capsys.readouterr().err


def test_sprint_runs_are_reproducible(tmp_path, capsys):
    """Sprint's SCM sampler draws fresh noise every step: the seed fixes that stream too."""
    folder = str(write_tiny_pipeline(tmp_path / "sprint", seed=5, sprint=True))
    outs = []
    for run_dir in ("a", "b"):
        code, paths, _ = run(capsys, "--model", folder, "--prompt", "a fox", "--seed", "3",
                             "--output_dir", str(tmp_path / run_dir), "--steps", "3", "--height", "64",
                             "--width", "96", "--dtype", "fp32", "--no_progress")
        assert code == 0
        outs.append(np.asarray(Image.open(paths[0])))
    assert np.array_equal(*outs)


def test_inpainting_from_the_command_line(folder, tmp_path, capsys):
    """--image --mask: the saved image equals pipe(..., image=, mask_image=) on the same resized files;
    --mask without --image is a clear error."""
    import torch

    from sana_core.pipeline import SanaPipeline, load_image

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
    pipe = SanaPipeline.from_pretrained(folder, dtype=torch.float32, device="cpu")
    want = pipe("a red fox", image=load_image(tmp_path / "photo.png", 96, 64),
                mask_image=load_image(tmp_path / "mask.png", 96, 64, mask=True), strength=1.0, seed=5, height=64,
                width=96, num_inference_steps=2, progress=False)[0]
    assert np.abs(np.asarray(Image.open(paths[0]), np.int16) - np.asarray(want, np.int16)).max() <= 1
    code, _, err = run(capsys, "--model", folder, "--mask", str(tmp_path / "mask.png"), *SMALL)
    assert code == 2 and "--mask needs --image" in err
