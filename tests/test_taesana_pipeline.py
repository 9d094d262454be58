"""Previews in the engine: `SanaPipeline(..., callback=, preview_every=)` hands the callback TAESANA decodes (after
`load_preview_decoder`) or the linear map of each N-th step's x0, and the CLI's --preview_every writes them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_taesana import write_taesana

from sana_core.cli import main
from sana_core.pipeline import SanaPipeline
from sana_core.previews import linear_rgb
from sana_core.tiny import write_tiny_pipeline

SMALL = {"height": 64, "width": 96, "num_inference_steps": 3}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("previews")
    return write_tiny_pipeline(root / "sana", seed=4), write_taesana(root / "taesana_decoder.pth")


def test_api_callback_gets_previews_on_request(files):
    folder, decoder = files
    pipe = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    seen = []
    pipe("a red fox", seed=1, callback=seen.append, preview_every=2, progress=False, **SMALL)
    assert [("preview" in s) for s in seen] == [False, True, False]
    torch.testing.assert_close(seen[1]["preview"], linear_rgb(seen[1]["denoised"]))
    assert seen[1]["preview"].shape == (1, 3, 2, 3)  # 1/32: the linear map
    pipe.load_preview_decoder(decoder)
    seen.clear()
    pipe("a red fox", seed=1, callback=seen.append, preview_every=1, progress=False, **SMALL)
    assert all(s["preview"].shape == (1, 3, 64, 96) for s in seen)
    expected = (pipe.preview_decoder.decode(seen[2]["denoised"]) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(seen[2]["preview"], expected)
    assert (seen[0]["preview"] - seen[2]["preview"]).abs().mean() > 1e-3  # each step's own x0
    with pytest.raises(ValueError, match="preview_every needs a callback"):
        pipe("a red fox", seed=1, preview_every=1, progress=False, **SMALL)


def test_cli_writes_previews(files, tmp_path, capsys):
    folder, decoder = files
    args = ["--model", str(folder), "--prompt", "a red fox", "--height", "64", "--width", "96", "--steps", "3",
            "--dtype", "fp32", "--no_progress", "--preview_every", "2"]
    assert main([*args, "--output_dir", str(tmp_path / "a"), "--preview_decoder", str(decoder)]) == 0
    assert sorted(p.name for p in (tmp_path / "a" / "previews").iterdir()) == ["00000_step002.png"]
    assert Image.open(tmp_path / "a" / "previews" / "00000_step002.png").size == (96, 64)
    assert main([*args, "--output_dir", str(tmp_path / "b")]) == 0
    small = np.asarray(Image.open(tmp_path / "b" / "previews" / "00000_step002.png"))
    assert small.shape == (2, 3, 3)
    assert capsys.readouterr().out.split() == [str(tmp_path / "a" / "00000.png"), str(tmp_path / "b" / "00000.png")]
    assert main(["--model", str(folder), "--preview_decoder", str(decoder), "--output_dir", str(tmp_path)]) == 2
    assert "--preview_decoder decodes the --preview_every previews" in capsys.readouterr().err
