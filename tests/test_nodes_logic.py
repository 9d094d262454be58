"""Node-layer logic that needs no ComfyUI: model folder listing, size presets, PAG layer parsing."""
import importlib.util
from pathlib import Path

import pytest

from sana_core.resolutions import preset_size, presets

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """nodes/<name>.py without importing the nodes package (whose other modules need ComfyUI)."""
    spec = importlib.util.spec_from_file_location(f"sana_nodes_{name}", ROOT / "nodes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_folders_are_listed_and_resolved(tmp_path):
    files = _load("files")
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "Sana_1600M_1024px_diffusers" / "transformer").mkdir(parents=True)
    (a / "Sana_1600M_1024px_diffusers" / "model_index.json").write_text("{}")
    (a / "Sana_1600M_1024px_diffusers" / "transformer" / "config.json").write_text("{}")
    (a / "loose_folder").mkdir()  # no marker: not a model
    (b / "gemma-2-2b-it").mkdir(parents=True)
    (b / "gemma-2-2b-it" / "config.json").write_text("{}")
    (b / ".hidden" / "x").mkdir(parents=True)
    (b / ".hidden" / "x" / "config.json").write_text("{}")
    listed = files.model_folders([str(a), str(b), str(tmp_path / "missing")])
    assert listed == ["Sana_1600M_1024px_diffusers/", "Sana_1600M_1024px_diffusers/transformer/", "gemma-2-2b-it/"]
    assert files.resolve([str(a), str(b)], "gemma-2-2b-it/") == str(b / "gemma-2-2b-it")
    with pytest.raises(FileNotFoundError, match="'nothing.safetensors' is not in any of the model folders"):
        files.resolve([str(a)], "nothing.safetensors")


def test_presets_are_multiples_of_32_near_the_base_area():
    table = presets()
    assert table["1024: 1024x1024 (1:1)"] == (1024, 1024)
    for name, (w, h) in table.items():
        base = int(name.split(":")[0])
        assert w % 32 == 0 and h % 32 == 0
        assert abs(w * h / base**2 - 1) < 0.08, name
    w, h = preset_size(1024, (16, 9))
    assert abs(w / h - 16 / 9) < 0.05


def test_latent_rgb_fit_recovers_a_linear_encoder():
    """An encoder that is linear in the 32x32 pixel means is inverted exactly by the fitted preview map."""
    import torch
    import torch.nn.functional as F

    from sana_core.previews import colour_fields, fit_latent_rgb

    g = torch.Generator().manual_seed(0)
    A, c = torch.randn(32, 3, generator=g), torch.randn(32, generator=g)

    def encode(x):  # (B, 3, H, W) -> (B, 32, H/32, W/32)
        return torch.einsum("kc,bchw->bkhw", A, F.avg_pool2d(x, 32)) + c[None, :, None, None]

    factors, bias = fit_latent_rgb(encode, n=4, size=128)
    assert len(factors) == 32 and len(factors[0]) == 3 and len(bias) == 3
    images = colour_fields(2, 128, seed=5)
    rgb = torch.einsum("bkhw,kc->bchw", encode(images), torch.tensor(factors)) + torch.tensor(bias)[None, :, None, None]
    torch.testing.assert_close(rgb, F.avg_pool2d(images, 32), rtol=1e-3, atol=1e-3)
