"""Training data and options: folder scans, the bad-data report, buckets, batching, the feature cache, flags."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sana_core.train import data
from sana_core.train.__main__ import main
from sana_core.train.config import parse


def _image(path, w=96, h=64, value=100):
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    _image(d / "good.png")
    (d / "good.txt").write_text("a red square\nignored")
    _image(d / "nocap.jpg")
    (d / "broken.webp").write_bytes(b"not an image")
    (d / "broken.txt").write_text("broken")
    _image(d / "tiny.png", 16, 16)
    (d / "tiny.txt").write_text("tiny")
    _image(d / "empty.png")
    (d / "empty.txt").write_text("\n")
    return d


def test_scan_reports_each_bad_file(folder):
    found = data.scan([folder], min_size=32)
    assert [(s.image.name, s.caption) for s in found.samples] == [("good.png", "a red square")]
    report = "\n".join(found.bad)
    for name, why in [("nocap.jpg", "no caption"), ("broken.webp", "cannot be read"), ("tiny.png", "too small"),
                      ("empty.png", "no caption")]:
        assert f"{name}: {why}" in report
    assert len(found.bad) == 4


def test_meta_data_json_lists_the_images(folder):
    (folder / "meta_data.json").write_text(json.dumps({"name": "x", "img_names": ["good", "gone.png"]}))
    found = data.scan([folder])
    assert [s.image.name for s in found.samples] == ["good.png"]
    assert found.bad == [f"{folder / 'gone.png'}: listed in meta_data.json but missing"]


def test_empty_and_missing_folders_are_errors_naming_them(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--data_dir .*empty: no images"):
        data.scan([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="--data_dir .*nowhere"):
        data.scan([tmp_path / "nowhere"])


def test_buckets_follow_nvlabs_tables():
    assert data.bucket_sizes(512, False) == [(512, 512)]
    sizes = data.bucket_sizes(512, True)
    assert (512, 512) in sizes and (256, 1024) in sizes and all(h % 32 == 0 == w % 32 for h, w in sizes)
    assert all(h % 32 == 0 == w % 32 for h, w in data.bucket_sizes(128, True))  # snapped below 512
    assert data.bucket_of((1024, 512), 512, True) == (352, 704)   # PIL (width, height) -> (h, w) of ratio 0.5
    assert data.bucket_of((1024, 512), 512, False) == (512, 512)
    with pytest.raises(ValueError, match="--resolution 500"):
        data.bucket_sizes(500, False)


def test_load_image_resizes_and_centre_crops(tmp_path):
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, 100:200] = 255
    Image.fromarray(a).save(tmp_path / "wide.png")
    x = data.load_image(tmp_path / "wide.png", 64, 64)
    assert x.shape == (3, 64, 64) and -1 <= x.min() and x.max() <= 1
    assert x[:, :, 10:54].mean() > 0.9  # the white centre third fills the crop


def test_batches_do_not_depend_on_the_process_layout():
    buckets = [(64, 64)] * 7 + [(64, 128)] * 5
    batches = data.epoch_batches(buckets, 4, seed=1, epoch=0)
    assert len(batches) == 2 and all(len({buckets[i] for i in b}) == 1 for b in batches)
    assert batches == data.epoch_batches(buckets, 4, seed=1, epoch=0) != data.epoch_batches(buckets, 4, 1, 1)
    batch = list(range(8))
    one = [i for _, part in data.micro_batches(batch, 2, 1, 0) for i in part]
    two = sorted((start, part) for r in (0, 1) for start, part in data.micro_batches(batch, 1, 2, r))
    assert one == batch and [i for _, part in two for i in part] == batch


def test_fingerprint_changes_with_the_weights():
    m = torch.nn.Linear(4, 4)
    a = data.fingerprint(m)
    with torch.no_grad():
        m.weight[0, 0] += 1
    assert data.fingerprint(m) != a and data.fingerprint(m, "chi") != data.fingerprint(m)


def test_config_file_and_flags(tmp_path):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("data_dir: [a, b]\nlr: 0.002\nmode: full\nmulti_scale: true\n")
    cfg = parse(["--config", str(cfg_file), "--lr", "0.003"])
    assert (cfg.data_dir, cfg.lr, cfg.mode, cfg.multi_scale) == (["a", "b"], 0.003, "full", True)
    assert cfg.resolved_optimizer() == "came" and cfg.resolved_max_grad_norm() == 0.1
    cfg_file.write_text("data_dir: [a]\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown options \\['learning_rate'\\]"):
        parse(["--config", str(cfg_file)])


@pytest.mark.parametrize("flags,message", [
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--resolution", "500"], "--resolution 500"),
    (["--caption_dropout", "1.5"], "--caption_dropout"),
    (["--mode", "full", "--fsdp"], None),
    (["--mode", "lora", "--fsdp"], "--fsdp"),
    (["--mode", "full", "--fsdp", "--validation_prompts", "a cat"], "--validation_prompts: validation sampling"),
    ([], "--data_dir"),
])
def test_bad_flags_name_the_flag(tmp_path, capsys, flags, message):
    argv = (["--data_dir", str(tmp_path)] if flags != [] else []) + flags
    if message is None:
        parse(argv)
        return
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_data_refuses_the_run_listing_the_files(folder, tmp_path, capsys):
    code = main(["--data_dir", str(folder), "--on_bad_data", "error", "--output_dir", str(tmp_path / "out"),
                 "--model", str(tmp_path / "no-model"), "--min_image_size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "4 bad training files" in err and "nocap.jpg: no caption" in err
