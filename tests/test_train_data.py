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
                      ("empty.png", "empty caption")]:
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
    cfg_file.write_text("data_dir: [a]\nlearnin_rate: 1\n")
    with pytest.raises(ValueError, match="unknown options \\['learnin_rate'\\]"):
        parse(["--config", str(cfg_file)])


@pytest.mark.parametrize("flags,message", [
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--resolution", "500"], "--resolution 500"),
    (["--caption_dropout", "1.5"], "--caption_dropout"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number, got nan"),
    (["--validation_guidance_scale", "inf"], "--validation_guidance_scale must be a finite number, got inf"),
    (["--lora_rank", "0"], "--lora_rank must be at least 1, got 0"),
    (["--flow_shift", "0"], "--flow_shift must be positive, got 0.0"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0, got -1.0"),
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
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_bad_data_refuses_the_run_listing_the_files(folder, tmp_path, capsys):
    code = main(["--data_dir", str(folder), "--on_bad_data", "error", "--output_dir", str(tmp_path / "out"),
                 "--model", str(tmp_path / "no-model"), "--min_image_size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "4 bad training files" in err and "nocap.jpg: no caption" in err


def test_captions_that_are_not_utf8_are_bad_data_naming_the_file(tmp_path):
    """A Latin-1 caption is reported as bad data (skipped or refused), never decoded with replacement
    characters."""
    _image(tmp_path / "cafe.png")
    (tmp_path / "cafe.txt").write_bytes("un caf\xe9 au lait".encode("latin-1"))
    _image(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("a café au lait", encoding="utf-8")
    found = data.scan([tmp_path])
    assert [s.caption for s in found.samples] == ["a café au lait"]
    assert len(found.bad) == 1 and f"{tmp_path / 'cafe.png'}: its caption cafe.txt is not UTF-8 text" in found.bad[0]


def test_transparent_images_are_composited_on_white_with_a_warning(tmp_path, caplog):
    """RGBA (and palette transparency) training images: one warning naming them; transparent pixels are trained
    as white, half-transparent ones blended with white, opaque ones unchanged."""
    a = np.zeros((64, 64, 4), np.uint8)
    a[..., 0] = 200                      # red everywhere
    a[:, :32, 3] = 0                     # left half transparent
    a[:, 32:48, 3] = 128                 # a half-transparent band
    a[:, 48:, 3] = 255                   # opaque right
    Image.fromarray(a, "RGBA").save(tmp_path / "logo.png")
    (tmp_path / "logo.txt").write_text("a logo")
    found = data.scan([tmp_path])
    assert len(found.samples) == 1
    assert "1 images have transparency; their transparent parts are trained as white" in caplog.text
    assert str(tmp_path / "logo.png") in caplog.text
    x = (data.load_image(tmp_path / "logo.png", 64, 64) + 1) * 127.5  # back to 0..255
    assert torch.allclose(x[:, :, :32], torch.tensor([255.0, 255, 255])[:, None, None], atol=0.5)
    assert torch.allclose(x[:, :, 48:], torch.tensor([200.0, 0, 0])[:, None, None], atol=0.5)
    assert torch.allclose(x[:, 5, 40], torch.tensor([227.5, 127, 127]), atol=1.5)  # 128/255 red over white


def test_diffusers_flag_names_and_old_spellings(tmp_path, caplog):
    """diffusers' train_dreambooth_lora_sana.py names set the same options (values spelled their way too:
    --mixed_precision no, --optimizer AdamW, --lora_layers a,b); our old names warn; --no_NAME turns a switch
    off; config files take the same spellings."""
    cfg = parse(["--instance_data_dir", "d", "--pretrained_model_name_or_path", "m", "--train_batch_size", "2",
                 "--max_train_steps", "5", "--num_train_epochs", "3", "--learning_rate", "2e-4", "--rank", "8",
                 "--lora_layers", "to_k,to_q", "--mixed_precision", "no", "--resume_from_checkpoint", "latest",
                 "--lr_warmup_steps", "3", "--adam_weight_decay", "0.01", "--validation_prompt", "a cat",
                 "--optimizer", "AdamW", "--no_progress"])
    got = {k: getattr(cfg, k) for k in ("data_dir", "model", "batch_size", "max_steps", "num_epochs", "lr",
                                        "lora_rank", "lora_targets", "dtype", "resume", "warmup_steps",
                                        "weight_decay", "validation_prompts", "optimizer", "progress")}
    assert got == {"data_dir": ["d"], "model": "m", "batch_size": 2, "max_steps": 5, "num_epochs": 3, "lr": 2e-4,
                   "lora_rank": 8, "lora_targets": ["to_k", "to_q"], "dtype": "fp32", "resume": "latest",
                   "warmup_steps": 3, "weight_decay": 0.01, "validation_prompts": ["a cat"], "optimizer": "adamw",
                   "progress": False}
    cfg = parse(["--data_dir", "d", "--precision", "bf16", "--cpu"])
    assert (cfg.dtype, cfg.device) == ("bf16", "cpu")
    assert "--precision is deprecated: use --dtype" in caplog.text
    assert "--cpu is deprecated: use --device cpu" in caplog.text
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"instance_data_dir": ["d"], "precision": "fp16", "cpu": True}))
    cfg = parse(["--config", str(cfg_file)])
    assert (cfg.data_dir, cfg.dtype, cfg.device) == (["d"], "fp16", "cpu")


def test_flag_mistakes_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--data_dir", str(tmp_path), "--lerning_rate", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "unrecognized arguments: --lerning_rate 1 (did you mean --learning_rate?)" in err


def test_clear_cache_alone_deletes_the_feature_cache(tmp_path, capsys):
    cache = tmp_path / "cache"
    (cache / "latents").mkdir(parents=True)
    (cache / "latents" / "x.safetensors").write_bytes(b"x")
    assert main(["--clear_cache", "--cache_dir", str(cache)]) == 0
    assert not cache.exists() and capsys.readouterr().out.strip() == str(cache)
