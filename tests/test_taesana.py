"""TAESANA (sana_core.taesana): the layout of the released files, the architecture of taesd.py's F32 variant, safe
and strict loading, and the previews built on it (sana_core.previews).

The released taesana_encoder.pth cannot be downloaded in CI and is not committed (a third-party binary), so its
key names and shapes are recorded below, generated once from the file (github.com/madebyollin/taesd at 5cccb12,
sha256 858f4e4c...618c1f); the decoder's from taesd.py's F32Decoder (taesana_decoder.pth is not in that snapshot).
With TAESANA_ENCODER=<path to taesana_encoder.pth> the real file is loaded too; with TAESD_PY=<path to taesd.py>
our modules are compared with taesd.py's own.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sana_core.checkpoints.files import CheckpointError
from sana_core.previews import LATENT_RGB_BIAS, LATENT_RGB_FACTORS, fit_latent_rgb, linear_rgb, previewer, with_previews
from sana_core.taesana import TAESANA, load_taesana

ENCODER_KEYS = """
0.weight:32x3x3x3 0.bias:32 2.weight:64x32x3x3 2.bias:64 4.conv.0.weight:64x64x3x3 4.conv.0.bias:64
4.conv.2.weight:64x64x3x3 4.conv.2.bias:64 4.conv.4.weight:64x64x3x3 4.conv.4.bias:64 5.weight:64x64x3x3
6.conv.0.weight:64x64x3x3 6.conv.0.bias:64 6.conv.2.weight:64x64x3x3 6.conv.2.bias:64 6.conv.4.weight:64x64x3x3
6.conv.4.bias:64 7.conv.0.weight:64x64x3x3 7.conv.0.bias:64 7.conv.2.weight:64x64x3x3 7.conv.2.bias:64
7.conv.4.weight:64x64x3x3 7.conv.4.bias:64 8.conv.0.weight:64x64x3x3 8.conv.0.bias:64 8.conv.2.weight:64x64x3x3
8.conv.2.bias:64 8.conv.4.weight:64x64x3x3 8.conv.4.bias:64 9.weight:64x64x3x3 10.conv.0.weight:64x64x3x3
10.conv.0.bias:64 10.conv.2.weight:64x64x3x3 10.conv.2.bias:64 10.conv.4.weight:64x64x3x3 10.conv.4.bias:64
11.conv.0.weight:64x64x3x3 11.conv.0.bias:64 11.conv.2.weight:64x64x3x3 11.conv.2.bias:64
11.conv.4.weight:64x64x3x3 11.conv.4.bias:64 12.conv.0.weight:64x64x3x3 12.conv.0.bias:64
12.conv.2.weight:64x64x3x3 12.conv.2.bias:64 12.conv.4.weight:64x64x3x3 12.conv.4.bias:64 13.weight:64x64x3x3
14.conv.0.weight:64x64x3x3 14.conv.0.bias:64 14.conv.2.weight:64x64x3x3 14.conv.2.bias:64
14.conv.4.weight:64x64x3x3 14.conv.4.bias:64 15.conv.0.weight:64x64x3x3 15.conv.0.bias:64
15.conv.2.weight:64x64x3x3 15.conv.2.bias:64 15.conv.4.weight:64x64x3x3 15.conv.4.bias:64
16.conv.0.weight:64x64x3x3 16.conv.0.bias:64 16.conv.2.weight:64x64x3x3 16.conv.2.bias:64
16.conv.4.weight:64x64x3x3 16.conv.4.bias:64 17.weight:32x64x3x3 17.bias:32
"""
DECODER_KEYS = """
1.weight:256x32x3x3 1.bias:256 3.conv.0.weight:256x256x3x3 3.conv.0.bias:256 3.conv.2.weight:256x256x3x3
3.conv.2.bias:256 3.conv.4.weight:256x256x3x3 3.conv.4.bias:256 4.conv.0.weight:256x256x3x3 4.conv.0.bias:256
4.conv.2.weight:256x256x3x3 4.conv.2.bias:256 4.conv.4.weight:256x256x3x3 4.conv.4.bias:256
5.conv.0.weight:256x256x3x3 5.conv.0.bias:256 5.conv.2.weight:256x256x3x3 5.conv.2.bias:256
5.conv.4.weight:256x256x3x3 5.conv.4.bias:256 7.weight:128x256x3x3 8.conv.0.weight:128x128x3x3 8.conv.0.bias:128
8.conv.2.weight:128x128x3x3 8.conv.2.bias:128 8.conv.4.weight:128x128x3x3 8.conv.4.bias:128
9.conv.0.weight:128x128x3x3 9.conv.0.bias:128 9.conv.2.weight:128x128x3x3 9.conv.2.bias:128
9.conv.4.weight:128x128x3x3 9.conv.4.bias:128 10.conv.0.weight:128x128x3x3 10.conv.0.bias:128
10.conv.2.weight:128x128x3x3 10.conv.2.bias:128 10.conv.4.weight:128x128x3x3 10.conv.4.bias:128
12.weight:64x128x3x3 13.conv.0.weight:64x64x3x3 13.conv.0.bias:64 13.conv.2.weight:64x64x3x3 13.conv.2.bias:64
13.conv.4.weight:64x64x3x3 13.conv.4.bias:64 14.conv.0.weight:64x64x3x3 14.conv.0.bias:64
14.conv.2.weight:64x64x3x3 14.conv.2.bias:64 14.conv.4.weight:64x64x3x3 14.conv.4.bias:64
15.conv.0.weight:64x64x3x3 15.conv.0.bias:64 15.conv.2.weight:64x64x3x3 15.conv.2.bias:64
15.conv.4.weight:64x64x3x3 15.conv.4.bias:64 17.weight:64x64x3x3 18.conv.0.weight:64x64x3x3 18.conv.0.bias:64
18.conv.2.weight:64x64x3x3 18.conv.2.bias:64 18.conv.4.weight:64x64x3x3 18.conv.4.bias:64
19.conv.0.weight:64x64x3x3 19.conv.0.bias:64 19.conv.2.weight:64x64x3x3 19.conv.2.bias:64
19.conv.4.weight:64x64x3x3 19.conv.4.bias:64 20.conv.0.weight:64x64x3x3 20.conv.0.bias:64
20.conv.2.weight:64x64x3x3 20.conv.2.bias:64 20.conv.4.weight:64x64x3x3 20.conv.4.bias:64 22.weight:64x64x3x3
23.conv.0.weight:64x64x3x3 23.conv.0.bias:64 23.conv.2.weight:64x64x3x3 23.conv.2.bias:64
23.conv.4.weight:64x64x3x3 23.conv.4.bias:64 24.conv.0.weight:64x64x3x3 24.conv.0.bias:64
24.conv.2.weight:64x64x3x3 24.conv.2.bias:64 24.conv.4.weight:64x64x3x3 24.conv.4.bias:64
25.conv.0.weight:64x64x3x3 25.conv.0.bias:64 25.conv.2.weight:64x64x3x3 25.conv.2.bias:64
25.conv.4.weight:64x64x3x3 25.conv.4.bias:64 27.weight:64x64x3x3 28.conv.0.weight:64x64x3x3 28.conv.0.bias:64
28.conv.2.weight:64x64x3x3 28.conv.2.bias:64 28.conv.4.weight:64x64x3x3 28.conv.4.bias:64 29.weight:3x64x3x3
29.bias:3
"""
#: taesd.py's F32Encoder / F32Decoder, layer by layer ("conv2": stride 2; "up": 2x nearest).
ENCODER_PLAN = ("conv2 relu conv2 relu block conv2 block block block conv2 block block block conv2 block block block "
                "conv")
DECODER_PLAN = ("clamp conv relu " + "block block block up conv " * 5 + "block conv")


def table(text: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in s.split("x")) for k, s in (item.split(":") for item in text.split())}


def state(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_taesana(path: Path, part: str = "decoder", seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """A TAESANA part with random weights (PyTorch's default init; the decoder's last conv scaled so that images
    span about 0..1) in the released layout: .pth or .safetensors."""
    torch.manual_seed(seed)
    module = getattr(TAESANA(encoder=part == "encoder", decoder=part == "decoder"), part)
    if part == "decoder":
        with torch.no_grad():
            module[-1].weight.mul_(20)
            module[-1].bias.fill_(0.5)
    sd = {k: v.to(dtype).contiguous() for k, v in module.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def run_plan(plan: str, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The forward pass taesd.py describes, from a state dict in the released layout (layer i = key prefix i)."""
    def conv(prefix: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        return F.conv2d(x, sd[prefix + "weight"], sd.get(prefix + "bias"), stride=stride, padding=1)

    for i, op in enumerate(plan.split()):
        if op.startswith("conv"):
            x = conv(f"{i}.", x, 2 if op == "conv2" else 1)
        elif op == "relu":
            x = torch.relu(x)
        elif op == "clamp":
            x = torch.tanh(x / 3) * 3
        elif op == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        else:  # block: relu(conv(relu(conv(relu(conv(x))))) + x)
            y = conv(f"{i}.conv.4.", torch.relu(conv(f"{i}.conv.2.", torch.relu(conv(f"{i}.conv.0.", x)))))
            x = torch.relu(y + x)
    return x


def test_layout_is_the_released_one(recording_ops):
    ops, made = recording_ops
    model = TAESANA(ops=ops)
    assert state(model.encoder) == table(ENCODER_KEYS)
    assert state(model.decoder) == table(DECODER_KEYS)
    assert len(made) == sum(1 for k in table(ENCODER_KEYS) | {"d" + k: 0 for k in table(DECODER_KEYS)}
                            if k.endswith("weight"))  # every conv built through ops
    assert TAESANA(encoder=False).encoder is None and TAESANA(decoder=False).decoder is None


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Random encoder/decoder files in the released layout (float32 .pth, float16 .safetensors)."""
    root = tmp_path_factory.mktemp("taesana")
    return {"encoder": write_taesana(root / "taesana_encoder.pth", "encoder", seed=1, dtype=torch.float32),
            "decoder": write_taesana(root / "taesana_decoder.pth", "decoder", seed=2, dtype=torch.float32),
            "decoder_sft": write_taesana(root / "taesana_decoder.safetensors", "decoder", seed=2)}


def test_forward_follows_taesd_architecture(files):
    model = load_taesana(files["encoder"], files["decoder"])
    enc = {k[8:]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    dec = {k[8:]: v for k, v in model.state_dict().items() if k.startswith("decoder.")}
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = model.encode(images)
    assert latents.shape == (2, 32, 2, 3)
    torch.testing.assert_close(latents, run_plan(ENCODER_PLAN, enc, images / 2 + 0.5), rtol=1e-5, atol=1e-5)
    z = torch.randn(1, 32, 1, 2, generator=torch.Generator().manual_seed(1)) * 2
    out = model.decode(z)
    assert out.shape == (1, 3, 32, 64) and out.std() > 0
    torch.testing.assert_close(out, run_plan(DECODER_PLAN, dec, z) * 2 - 1, rtol=1e-5, atol=1e-5)


def test_pth_safetensors_and_combined_files_load_alike(files, tmp_path):
    pth, sft = files["decoder"], files["decoder_sft"]
    z = torch.randn(1, 32, 1, 1, generator=torch.Generator().manual_seed(3))
    a, b = load_taesana(decoder=pth), load_taesana(decoder=sft)  # the same weights, stored in float16 there
    assert a.encoder is None and next(b.parameters()).dtype == torch.float32
    assert next(load_taesana(decoder=pth, dtype=torch.float16).parameters()).dtype == torch.float16
    torch.testing.assert_close(a.decode(z), b.decode(z), rtol=0, atol=2e-2)
    both = {f"taesd_decoder.{k}": v for k, v in torch.load(pth, weights_only=True).items()}
    both |= {f"taesd_encoder.{k}": v for k, v in torch.load(files["encoder"], weights_only=True).items()}
    torch.save(both, tmp_path / "taesana.pth")
    c = load_taesana(tmp_path / "taesana.pth", tmp_path / "taesana.pth")
    torch.testing.assert_close(c.decode(z), a.decode(z))
    with pytest.raises(ValueError, match="has no encoder: load taesana_encoder.pth"):
        a.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 32"):
        c.encode(torch.zeros(1, 3, 40, 32))


def test_other_files_are_errors_naming_them(files, tmp_path):
    with pytest.raises(CheckpointError, match="taesana_encoder.pth: this is a TAESANA encoder, expected the decoder"):
        load_taesana(decoder=files["encoder"])
    torch.save({"1.weight": torch.zeros(64, 4, 3, 3), "1.bias": torch.zeros(64)}, tmp_path / "taesd_decoder.pth")
    with pytest.raises(CheckpointError, match=r"taesd_decoder.pth: 1.weight has shape \(64, 4, 3, 3\).*another model"):
        load_taesana(decoder=tmp_path / "taesd_decoder.pth")
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "dcae.pth")
    with pytest.raises(CheckpointError, match="dcae.pth: not a TAESANA decoder .*encoder.conv_in.weight"):
        load_taesana(decoder=tmp_path / "dcae.pth")
    sd = torch.load(files["decoder"], weights_only=True)
    del sd["3.conv.2.bias"]
    torch.save(sd, tmp_path / "truncated.pth")
    with pytest.raises(CheckpointError, match=r"truncated.pth: .*1 missing keys \(e.g. \['decoder.3.conv.2.bias'\]"):
        load_taesana(decoder=tmp_path / "truncated.pth")
    torch.save({"1.weight": torch.zeros(256, 32, 3, 3), "code": Path(".")}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="pickled.pth: cannot read this checkpoint with torch.load"):
        load_taesana(decoder=tmp_path / "pickled.pth")  # weights_only: no Python objects are unpickled
    with pytest.raises(ValueError, match="give the encoder and/or decoder"):
        load_taesana()


@pytest.mark.skipif(not os.environ.get("TAESANA_ENCODER"), reason="set TAESANA_ENCODER to taesana_encoder.pth")
def test_released_encoder_loads_strictly_and_gives_the_preview_map():
    path = Path(os.environ["TAESANA_ENCODER"])
    assert {k: tuple(v.shape) for k, v in torch.load(path, weights_only=True).items()} == table(ENCODER_KEYS)
    model = load_taesana(encoder=path)  # strict: every key used, every shape equal
    y, x = torch.meshgrid(torch.linspace(-1, 1, 96), torch.linspace(-1, 1, 128), indexing="ij")
    image = torch.stack([x, y, x * y])[None]  # (1, 3, 96, 128)
    latents = model.encode(image)
    assert latents.shape == (1, 32, 3, 4) and latents.isfinite().all() and 0.3 < latents.std() < 3
    factors, bias = fit_latent_rgb(model.encode, n=32, size=256)  # how the constants were made
    torch.testing.assert_close(torch.tensor(factors), torch.tensor(LATENT_RGB_FACTORS), rtol=0, atol=1e-3)
    torch.testing.assert_close(torch.tensor(bias), torch.tensor(LATENT_RGB_BIAS), rtol=0, atol=1e-3)


@pytest.mark.skipif(not os.environ.get("TAESD_PY"), reason="set TAESD_PY to madebyollin/taesd's taesd.py")
def test_equals_taesd_py(tmp_path):
    spec = importlib.util.spec_from_file_location("taesd_reference", os.environ["TAESD_PY"])
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    torch.manual_seed(0)
    encoder, decoder = ref.F32Encoder().eval(), ref.F32Decoder().eval()
    torch.save(encoder.state_dict(), tmp_path / "e.pth")
    torch.save(decoder.state_dict(), tmp_path / "d.pth")
    ours = load_taesana(tmp_path / "e.pth", tmp_path / "d.pth")
    images, z = torch.rand(1, 3, 64, 64), torch.randn(1, 32, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(images * 2 - 1), encoder(images))
        torch.testing.assert_close(ours.decode(z), decoder(z) * 2 - 1)


def test_previews_full_size_with_a_decoder_else_the_linear_map(files):
    z = torch.randn(2, 32, 1, 2, generator=torch.Generator().manual_seed(4))
    small = previewer()(z)
    assert small.shape == (2, 3, 1, 2) and 0 <= small.min() and small.max() <= 1
    expected = torch.einsum("bkhw,kc->bchw", z, torch.tensor(LATENT_RGB_FACTORS)) + torch.tensor(LATENT_RGB_BIAS)[:, None, None]
    torch.testing.assert_close(small, (expected / 2 + 0.5).clamp(0, 1))
    torch.testing.assert_close(linear_rgb(z), small)
    decoder = load_taesana(decoder=files["decoder"])
    full = previewer(decoder)(z)
    assert full.shape == (2, 3, 32, 64) and 0 <= full.min() and full.max() <= 1 and full.std() > 0.01
    torch.testing.assert_close(full, (decoder.decode(z) / 2 + 0.5).clamp(0, 1))
    seen = []
    callback = with_previews(seen.append, every=2, preview=previewer())
    for i in range(5):
        callback({"i": i, "denoised": z * i, "x": z})
    assert [("preview" in s) for s in seen] == [False, True, False, True, False]  # steps 2 and 4
    torch.testing.assert_close(seen[3]["preview"], linear_rgb(z * 3))
    with pytest.raises(ValueError, match="preview_every=0 must be at least 1"):
        with_previews(seen.append, every=0, preview=previewer())
