"""End to end inside the real ComfyUI (CPU): every bundled workflow, engine equality, errors, cancel.

Runs when COMFYUI_PATH points at a ComfyUI checkout (COMFYUI_PYTHON: the Python of its environment, default
this one); skipped otherwise, as in CI. The server is started on a free port with tiny models in its model
folders (extra_model_paths), this repo as a custom node, and a temporary output folder.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_client import Comfy, error_of, to_api

ROOT = Path(__file__).resolve().parents[1]
COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")
SMALL = (192, 128)  # width, height of the test images
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_upscaler(path: Path) -> None:
    """A random 2x RealESRGAN-Compact (the layout spandrel recognises): conv, PReLU, conv, PReLU, conv."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {"body.0.weight": torch.randn(8, 3, 3, 3, generator=g) * 0.1, "body.0.bias": torch.zeros(8),
          "body.1.weight": torch.full((8,), 0.2), "body.2.weight": torch.randn(8, 8, 3, 3, generator=g) * 0.1,
          "body.2.bias": torch.zeros(8), "body.3.weight": torch.full((8,), 0.2),
          "body.4.weight": torch.randn(12, 8, 3, 3, generator=g) * 0.1, "body.4.bias": torch.zeros(12)}
    save_file(sd, str(path))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from PIL import Image
    from safetensors.torch import save_file

    from sana_core.checkpoints.dit import load_dit, save_dit
    from sana_core.tiny import write_tiny_gemma, write_tiny_pipeline

    root = tmp_path_factory.mktemp("comfy")
    models = root / "models"
    for sub in ("diffusion_models", "text_encoders", "vae", "upscale_models", "loras"):
        (models / sub).mkdir(parents=True)
    sana = write_tiny_pipeline(root / "tiny-sana", seed=21)
    sprint = write_tiny_pipeline(root / "tiny-sprint", seed=22, sprint=True)
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (models / sub / "tiny-sana").symlink_to(sana)
    (models / "diffusion_models" / "tiny-sprint").symlink_to(sprint)
    (models / "text_encoders" / "tiny-sprint").symlink_to(sprint)
    write_tiny_gemma(root / "gemma", seed=3, single_file=models / "diffusion_models" / "gemma_in_dit_slot.safetensors")
    save_file({"input_blocks.0.0.weight": torch.zeros(4, 4), "middle_block.0.in_layers.0.weight": torch.zeros(4)},
              str(models / "diffusion_models" / "sdxl_unet.safetensors"))
    _tiny_upscaler(models / "upscale_models" / "tiny_compact_x2.safetensors")
    overflowing = load_dit(sana)
    with torch.no_grad():
        overflowing.final_layer.linear.weight.mul_(1e5)  # its output overflows float16 (65504)
    save_dit(overflowing, models / "diffusion_models" / "tiny_fp16_overflow.safetensors", layout="nvlabs",
             dtype=torch.float16)
    g = torch.Generator().manual_seed(1)  # a LoRA on the fused qkv of block 0, in ComfyUI's generic key layout
    save_file({"diffusion_model.blocks.0.attn.qkv.lora_down.weight": torch.randn(4, 64, generator=g),
               "diffusion_model.blocks.0.attn.qkv.lora_up.weight": torch.randn(192, 4, generator=g)},
              str(models / "loras" / "tiny_sana_lora.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn1.to_k.lora_A.weight": torch.randn(4, 64, generator=g),
               "transformer.transformer_blocks.0.attn1.to_k.lora_B.weight": torch.randn(64, 4, generator=g),
               "transformer.transformer_blocks.1.attn2.to_v.lora_A.weight": torch.randn(4, 64, generator=g),
               "transformer.transformer_blocks.1.attn2.to_v.lora_B.weight": torch.randn(64, 4, generator=g)},
              str(models / "loras" / "diffusers_format_lora.safetensors"))
    (root / "input").mkdir()
    gradient = np.linspace(0, 255, SMALL[0] * SMALL[1] * 3).reshape(SMALL[1], SMALL[0], 3).astype(np.uint8)
    Image.fromarray(gradient).save(root / "input" / "example.png")
    nodes = root / "custom_nodes"
    nodes.mkdir()
    installed = [p for p in (Path(COMFY) / "custom_nodes").iterdir() if p.resolve() == ROOT]
    if not installed:
        (nodes / "comfyui-sana").symlink_to(ROOT)
    config = root / "extra_model_paths.yaml"
    config.write_text(json.dumps({"sana_tests": {
        "base_path": str(root), "diffusion_models": "models/diffusion_models", "text_encoders": "models/text_encoders",
        "vae": "models/vae", "upscale_models": "models/upscale_models", "loras": "models/loras",
        "custom_nodes": "custom_nodes"}}))
    port = _free_port()
    log = open(root / "comfy.log", "w")
    proc = subprocess.Popen(
        [os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1",
         "--port", str(port), "--extra-model-paths-config", str(config), "--output-directory", str(root / "output"),
         "--input-directory", str(root / "input"), "--preview-method", "auto"],
        cwd=COMFY, stdout=log, stderr=subprocess.STDOUT)
    client = Comfy(f"http://127.0.0.1:{port}")
    for _ in range(240):
        if proc.poll() is not None:
            pytest.fail(f"ComfyUI exited: {(root / 'comfy.log').read_text()[-3000:]}")
        try:
            if client.request("GET", "/object_info/SanaSampler")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    client.root, client.sana, client.sprint = root, sana, sprint
    client.info = client.request("GET", "/object_info")[1]
    yield client
    proc.terminate()
    proc.wait(30)
    log.close()


def _images(server, entry: dict) -> dict[str, list[np.ndarray]]:
    """Saved images per node id (SaveImage outputs), as uint8 arrays."""
    from PIL import Image

    out = {}
    for node_id, output in entry["outputs"].items():
        files = [server.root / "output" / im["subfolder"] / im["filename"] for im in output.get("images", [])
                 if im["type"] == "output"]
        if files:
            out[node_id] = [np.asarray(Image.open(f)) for f in files]
    return out


def _prepare(server, workflow: Path, steps: int = 3) -> dict:
    """A bundled workflow converted to API format, with tiny models, small images and few steps."""
    prompt = to_api(json.loads(workflow.read_text()), server.info)
    sprint = "sprint" in workflow.stem
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "SanaCheckpointLoader":
            inputs["ckpt_name"] = "tiny-sprint/" if sprint else "tiny-sana/"
        elif kind in ("SanaGemmaLoader", "SanaDCAELoader"):
            inputs["text_encoder" if kind == "SanaGemmaLoader" else "vae_name"] = "tiny-sana/"
        elif kind in ("SanaEmptyLatentImage", "ImageScale"):
            inputs["width"], inputs["height"] = SMALL
        elif kind in ("SanaSampler", "KSampler", "SanaScheduler") and not sprint:
            inputs["steps"] = steps
        elif kind == "UpscaleModelLoader":
            inputs["model_name"] = "tiny_compact_x2.safetensors"
        elif kind == "SanaDCAEDecode":
            inputs["tile_size"], inputs["overlap"] = 128, 64
    return prompt


def test_nodes_are_registered_with_descriptions(server):
    ours = {k: v for k, v in server.info.items() if v.get("python_module", "").endswith("comfyui-sana")
            or k.startswith("Sana")}
    assert {"SanaCheckpointLoader", "SanaLoraLoader", "SanaGemmaLoader", "SanaDCAELoader", "SanaGemmaTextEncode", "SanaSampler",
            "SanaEmptyLatentImage", "SanaDCAEDecode", "SanaDCAEEncode", "SanaSamplerSelect", "SanaScheduler"} <= set(ours)
    assert all(v["description"] and v["category"] == "Sana" for v in ours.values())
    choices = server.info["SanaCheckpointLoader"]["input"]["required"]["ckpt_name"][1]["options"]
    assert {"tiny-sana/", "tiny-sprint/", "tiny-sana/transformer/", "sdxl_unet.safetensors"} <= set(choices)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_bundled_workflow_runs(server, workflow):
    entry = server.run(_prepare(server, workflow))
    assert entry["status"]["status_str"] == "success", error_of(entry)
    images = [im for ims in _images(server, entry).values() for im in ims]
    assert images
    for im in images:
        assert im.shape[-1] == 3 and im.std() > 1  # an image, not a blank
    if "upscale" in workflow.stem:
        assert images[0].shape[:2] == (SMALL[1] * 2, SMALL[0] * 2)
    else:
        assert images[0].shape[:2] == (SMALL[1], SMALL[0])


def test_sampling_sends_live_previews(server):
    """With --preview-method auto, SanaSampler's steps send preview images (Latent2RGB with the map the
    DC-AE loader fitted) over the websocket."""
    websocket = pytest.importorskip("websocket")
    client_id = "sana-preview-test"
    ws = websocket.create_connection(f"ws://{server.url.split('//')[1]}/ws?clientId={client_id}", timeout=120)
    prompt = _prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json", steps=5)
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "SanaSampler")
    prompt[sampler]["inputs"]["seed"] = 12345  # not cached: the sampler runs
    code, answer = server.request("POST", "/prompt", {"prompt": prompt, "client_id": client_id})
    assert code == 200
    previews, progress = 0, []
    while True:
        message = ws.recv()
        if isinstance(message, bytes):
            previews += 1
            continue
        event = json.loads(message)
        if event["type"] == "progress" and event["data"]["node"] == sampler:
            progress.append(event["data"]["value"])
        if event["type"] in ("executing", "execution_success") and event["data"].get("node") is None \
                and event["data"].get("prompt_id") == answer["prompt_id"]:
            break
    ws.close()
    assert progress[-1] == 5 and previews >= 5


def test_sana_sampler_equals_engine_and_custom_advanced(server):
    """SanaSampler = the sana_core pipeline on the same files and seed; SamplerCustomAdvanced with our SAMPLER
    and SIGMAS = SanaSampler."""
    from sana_core.pipeline import SanaPipeline

    prompt = _prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json", steps=4)
    custom = _prepare(server, ROOT / "workflows" / "sana_sampler_custom_advanced.json", steps=4)
    got = _images(server, server.run(prompt))
    got_custom = _images(server, server.run(custom))
    (engine_png,), (custom_png,) = got.values(), got_custom.values()
    pipe = SanaPipeline.from_pretrained(server.sana, dtype=torch.float32, device="cpu")
    texts = {n["inputs"]["role"]: n["inputs"]["text"] for n in prompt.values() if n["class_type"] == "SanaGemmaTextEncode"}
    want = pipe(texts["positive"], negative_prompt=texts["negative"], seed=42, num_inference_steps=4,
                width=SMALL[0], height=SMALL[1], output_type="pt", progress=False)
    want = (want[0].permute(1, 2, 0).numpy() * 255).astype(np.int16)
    assert np.abs(engine_png[0].astype(np.int16) - want).max() <= 1
    assert np.abs(custom_png[0].astype(np.int16) - engine_png[0].astype(np.int16)).max() <= 1


@pytest.mark.parametrize("file,message", [
    ("sdxl_unet.safetensors", "not a Sana DiT checkpoint: it looks like a Stable Diffusion / SDXL UNet"),
    ("gemma_in_dit_slot.safetensors", "not a Sana DiT checkpoint: it looks like a language model"),
    ("missing.safetensors", "'missing.safetensors' is not in any of the model folders"),
])
def test_wrong_model_files_are_node_errors(server, file, message):
    prompt = _prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json")
    loader = next(k for k, n in prompt.items() if n["class_type"] == "SanaCheckpointLoader")
    prompt[loader]["inputs"]["ckpt_name"] = file
    entry = server.run(prompt)
    error = error_of(entry)
    assert error and error["node_type"] == "SanaCheckpointLoader" and message in error["exception_message"]


@pytest.mark.parametrize("node,lora,strength_input", [
    ("LoraLoaderModelOnly", "tiny_sana_lora.safetensors", "strength_model"),  # our module names, core node
    ("SanaLoraLoader", "diffusers_format_lora.safetensors", "strength"),    # PEFT names into fused qkv / kv
])
def test_lora_loaders_patch_our_model(server, node, lora, strength_input):
    """A LoRA loader on our MODEL: strength 0 gives the plain image, strength 1 another one."""
    images = []
    for strength in (0.0, 1.0):
        prompt = _prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json")
        sampler = next(k for k, n in prompt.items() if n["class_type"] == "SanaSampler")
        prompt["lora"] = {"class_type": node, "inputs": {
            "model": prompt[sampler]["inputs"]["model"], "lora_name": lora, strength_input: strength}}
        prompt[sampler]["inputs"]["model"] = ["lora", 0]
        entry = server.run(prompt)
        assert entry["status"]["status_str"] == "success", error_of(entry)
        images.append(next(iter(_images(server, entry).values()))[0].astype(np.int16))
    plain = next(iter(_images(server, server.run(_prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json"))).values()))[0]
    assert np.abs(images[0] - plain).max() <= 1
    assert np.abs(images[1] - plain).max() > 10


@pytest.mark.parametrize("workflow", ["sana_text_to_image_1024.json", "sana_ksampler.json"])
def test_fp16_overflow_is_recomputed_wider(server, workflow):
    """A float16 DiT that overflows finishes (SanaSampler and core KSampler), computing in a wider dtype from
    the overflowing step on, with a warning; the image equals the float32 run of the same weights."""
    images = []
    for dtype in ("fp16", "fp32"):
        prompt = _prepare(server, ROOT / "workflows" / workflow)
        loader = next(n for n in prompt.values() if n["class_type"] == "SanaCheckpointLoader")
        loader["inputs"]["ckpt_name"], loader["inputs"]["weight_dtype"] = "tiny_fp16_overflow.safetensors", dtype
        entry = server.run(prompt)
        assert entry["status"]["status_str"] == "success", error_of(entry)
        images.append(next(iter(_images(server, entry).values()))[0].astype(np.int16))
    assert np.abs(images[0] - images[1]).max() <= 1
    assert "the DiT overflowed in float16 (inf/NaN); computing in torch.float32" in (server.root / "comfy.log").read_text()


def test_unchanged_prompt_reuses_loaded_models(server):
    prompt = _prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json")
    server.run(prompt)
    entry = server.run(prompt)
    cached = next(data["nodes"] for kind, data in entry["status"]["messages"] if kind == "execution_cached")
    loaders = {k for k, n in prompt.items() if n["class_type"].endswith("Loader")}
    assert loaders <= set(cached)


def test_size_not_multiple_of_32_is_refused(server):
    prompt = _prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json")
    latent = next(k for k, n in prompt.items() if n["class_type"] == "SanaEmptyLatentImage")
    prompt[latent]["inputs"]["width"] = 200
    code, answer = server.queue(prompt)
    assert code == 400
    assert "multiples of 32" in json.dumps(answer["node_errors"][latent])


def test_cancel_then_next_prompt_runs(server):
    slow = _prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json", steps=200)
    latent = next(k for k, n in slow.items() if n["class_type"] == "SanaEmptyLatentImage")
    slow[latent]["inputs"]["width"] = slow[latent]["inputs"]["height"] = 4096  # 200 steps on 16k tokens: seconds
    code, answer = server.queue(slow)
    assert code == 200
    for _ in range(600):  # wait until it is sampling
        _, queue = server.request("GET", "/queue")
        if queue["queue_running"]:
            break
        time.sleep(0.1)
    time.sleep(1.5)
    server.request("POST", "/interrupt")
    entry = server.wait(answer["prompt_id"], timeout=120)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and entry["status"]["status_str"] == "error"
    good = server.run(_prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json"))
    assert good["status"]["status_str"] == "success"


def test_frontend_loads_every_workflow_and_the_widgets_work(server):
    """Headless Chromium on the real frontend (needs node, playwright-core in PLAYWRIGHT_CORE or on the node
    path, and Chromium in CHROMIUM or /usr/bin/chromium): no bundled workflow has a missing node, the
    frontend's own API prompt equals our converter's, the presets set width/height, sizes snap to 32."""
    import shutil

    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not shutil.which("node") or not os.path.exists(chromium):
        pytest.skip("node and Chromium are needed for the frontend check")
    out = subprocess.run(["node", str(ROOT / "tests" / "frontend_check.cjs"), server.url, *map(str, WORKFLOWS)],
                         capture_output=True, text=True, timeout=300)
    if "Cannot find module" in out.stderr:
        pytest.skip("playwright-core is not installed (set PLAYWRIGHT_CORE)")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert not report["errors"], report["errors"]
    for file, result in report["workflows"].items():
        assert result["missing"] == [], file
        ours = to_api(json.loads(Path(file).read_text()), server.info)
        theirs = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in result["prompt"].items()}
        assert theirs == ours, file
    widget = report["widget"]
    assert widget["fromPreset"] == [1376, 768] and widget["preset"] == "1024: 1376x768 (16:9)"
    assert widget["snapped"] == 992
