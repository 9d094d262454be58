"""In the real ComfyUI (the shared `server`, previews on with --preview-method auto): TAESANA live previews from
models/vae_approx/taesana_decoder.*, the latent-to-RGB fallback without it, no preview fitting at load, and
TAESANA as a draft VAE for core VAEDecode / VAEEncode. The decoder/encoder files have random weights in the
released layout (test_taesana.write_taesana)."""
from __future__ import annotations

import io
import itertools
import json
import struct

import numpy as np
import pytest
import torch
from comfy_server import SMALL, T2I, add, node, prepare, run_images, save
from PIL import Image
from test_taesana import write_taesana


def previews(server, prompt: dict) -> list[np.ndarray]:
    """Run `prompt`, collecting the preview images the websocket sends (RGB arrays, in order)."""
    websocket = pytest.importorskip("websocket")
    client_id = "sana-taesana-previews"
    ws = websocket.create_connection(f"ws://{server.url.split('//')[1]}/ws?clientId={client_id}", timeout=120)
    code, answer = server.request("POST", "/prompt", {"prompt": prompt, "client_id": client_id})
    assert code == 200, answer
    images = []
    try:
        while True:
            message = ws.recv()
            if isinstance(message, bytes):
                if struct.unpack(">I", message[:4])[0] == 1:  # PREVIEW_IMAGE: image type, then the JPEG/PNG bytes
                    images.append(np.asarray(Image.open(io.BytesIO(message[8:])).convert("RGB"), dtype=np.float32))
                continue
            data = json.loads(message)
            if data["type"] == "execution_error":
                pytest.fail(data["data"]["exception_message"])
            if data["type"] in ("executing", "execution_success") and data["data"].get("node") is None \
                    and data["data"].get("prompt_id") == answer["prompt_id"]:
                return images
    finally:
        ws.close()


def detail(image: np.ndarray) -> float:
    """Mean horizontal step between neighbouring pixels. Previews arrive scaled to fit --preview-size (512 px), so
    a linear-map preview (6 x 4 for a SMALL image) and a full-size one (192 x 128) come at the same size; the first
    is smooth there (at most 255 levels over 85 px), the second carries the decoder's 1-pixel stripes."""
    return float(np.abs(np.diff(image, axis=1)).mean())


def striped_decoder(path):
    """A random TAESANA decoder whose conv after the last 2x upsampling takes horizontal differences (nonzero only
    where the upsampled pixel pairs meet), so that its images have 1-pixel stripes no 1/32 preview can show."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(write_taesana(path, "decoder", seed=7)))
    weight, channels = torch.zeros_like(sd["27.weight"]), torch.arange(64)
    weight[channels, channels, 1, 1], weight[channels, channels, 1, 0] = 12.0, -12.0
    save_file({**sd, "27.weight": weight}, str(path))
    return path


@pytest.fixture
def taesana(server):
    """TAESANA files in the server's vae_approx folder for one test (ComfyUI lists the folder again)."""
    folder = server.root / "models" / "vae_approx"
    files = [striped_decoder(folder / "taesana_decoder.safetensors"),
             write_taesana(folder / "taesana_encoder.safetensors", "encoder", seed=8)]
    yield files
    for f in files:
        f.unlink()


def _sampling(server, seed: int, workflow=T2I, steps: int = 4) -> dict:
    """A workflow with `steps` and `seed` (a new seed: ComfyUI runs the sampler again)."""
    prompt = prepare(server, workflow, steps=steps)
    for n in prompt.values():
        field = {"SanaSampler": "seed", "KSampler": "seed", "RandomNoise": "noise_seed"}.get(n["class_type"])
        if field:
            n["inputs"][field] = seed
    return prompt


@pytest.mark.parametrize("workflow", ["sana_ksampler", "sana_sampler_custom_advanced"])
def test_core_samplers_get_taesana_previews(server, taesana, workflow):
    images = previews(server, _sampling(server, 1000, T2I.with_name(f"{workflow}.json"), steps=2))
    assert len(images) == 2 and all(detail(im) > 2.5 for im in images), [detail(im) for im in images]


def test_taesana_previews_are_full_size_and_follow_the_steps(server, taesana):
    images = previews(server, _sampling(server, 1001))
    assert len(images) == 4
    assert all(detail(im) > 2.5 for im in images), [detail(im) for im in images]
    assert all(np.abs(a - b).mean() > 1 for a, b in itertools.pairwise(images))  # each step's own x0
    log = (server.root / "comfy.log").read_text()
    assert "loaded TAESANA decoder from" in log and "taesana_decoder.safetensors" in log


def test_draft_vae_under_core_vae_nodes(server, taesana):
    from sana_core.taesana import load_taesana

    prompt = _sampling(server, 1001)  # the previous test's sampling: ComfyUI has it cached
    draft = add(prompt, "draft", "SanaDraftVAELoader", decoder="taesana_decoder.safetensors",
                encoder="taesana_encoder.safetensors")
    save(prompt, "draft", add(prompt, "dec", "VAEDecode", samples=[node(prompt, "SanaSampler"), 0], vae=draft))
    pixels = add(prompt, "load", "LoadImage", image="example.png")
    latent = add(prompt, "enc", "VAEEncode", pixels=pixels, vae=draft)
    save(prompt, "roundtrip", add(prompt, "dec2", "VAEDecode", samples=latent, vae=draft))
    images = run_images(server, prompt)
    assert images["draft"].shape == images["roundtrip"].shape == (SMALL[1], SMALL[0], 3)
    assert images["draft"].std() > 1
    model = load_taesana(*taesana[::-1])  # the same weights here, float32: encode and decode example.png
    example = torch.from_numpy(np.asarray(Image.open(server.root / "input" / "example.png"), dtype=np.float32))
    with torch.no_grad():
        z = model.encode(example.permute(2, 0, 1)[None] / 127.5 - 1) / 0.41407  # LATENTs hold raw DC-AE latents
        expected = ((model.decode(z * 0.41407)[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255)
    assert np.abs(images["roundtrip"] - expected.round().numpy()).max() <= 2


def test_without_the_decoder_previews_use_the_linear_map_and_nothing_is_fitted(server):
    images = previews(server, _sampling(server, 1002))
    assert len(images) == 4 and all(detail(im) < 2 for im in images), [detail(im) for im in images]
    assert images[0].std() > 1  # a picture, not a blank
    assert "live-preview map" not in (server.root / "comfy.log").read_text()  # no fitting at DC-AE load
    assert not (server.root / "user" / "sana").exists()
