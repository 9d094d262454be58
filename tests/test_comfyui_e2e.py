"""End to end inside the real ComfyUI (CPU): every bundled workflow, engine equality, errors, cancel.

The server (tests/comfy_server.py, the `server` fixture) is ComfyUI from COMFYUI_PATH or built from the snapshot in
../shared/comfyui, with tiny models in its model folders, this repo as a custom node and temporary folders.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_client import error_of, to_api, workflow_builder
from comfy_server import MASKED, ROOT, SMALL, T2I, WORKFLOWS, add, node, prepare, prompt_texts, run_images, save, saved_images, unavailable


def test_nodes_are_registered_with_descriptions(server):
    ours = {k: v for k, v in server.info.items() if v.get("python_module", "").endswith("comfyui-sana")
            or k.startswith("Sana")}
    assert {"SanaCheckpointLoader", "SanaFolderLoader", "SanaLoraLoader", "SanaGemmaLoader", "SanaDCAELoader",
            "SanaGemmaTextEncode", "SanaSampler", "SanaPAG", "SanaEmptyLatentImage", "SanaDCAEDecode", "SanaDCAEEncode",
            "SanaSamplerSelect", "SanaScheduler"} <= set(ours)
    assert all(v["description"] and v["category"] == "Sana" for v in ours.values())
    choices = server.info["SanaCheckpointLoader"]["input"]["required"]["ckpt_name"][1]["options"]
    assert {"sana_e2e_tiny/", "sana_e2e_sprint/", "sana_e2e_tiny/transformer/", "sana_e2e_sdxl_unet.safetensors"} <= set(choices)
    assert not {"sana_e2e_tiny/text_encoder/", "sana_e2e_tiny/vae/"} & set(choices)  # other components
    assert server.info["SanaDCAELoader"]["output"] == ["VAE"]
    folders = server.info["SanaFolderLoader"]["input"]["required"]["folder"][1]["options"]
    assert "sana_e2e_tiny/" in folders and "sana_e2e_tiny/transformer/" not in folders
    untipped = [(node, name) for node, v in ours.items() for group in ("required", "optional")
                for name, spec in v["input"].get(group, {}).items()
                if (isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"))
                and not (spec[1] if len(spec) > 1 else {}).get("tooltip")]
    assert not untipped
    sockets = [(n, name) for n, v in ours.items() for group in ("required", "optional")
               for name, spec in v["input"].get(group, {}).items() if not (spec[1] if len(spec) > 1 else {}).get("tooltip")]
    assert not sockets
    assert not [n for n, v in ours.items() if len(v.get("output_tooltips") or []) != len(v["output"])
                or not all(v["output_tooltips"])]


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_bundled_workflow_runs(server, workflow):
    entry = server.run(prepare(server, workflow))
    assert entry["status"]["status_str"] == "success", (error_of(entry) or {}).get("exception_message")
    images = [im for ims in saved_images(server, entry).values() for im in ims]
    assert images
    for im in images:
        assert im.shape[-1] == 3 and im.std() > 1  # an image, not a blank
    if "upscale" in workflow.stem:
        assert images[0].shape[:2] == (SMALL[1] * 2, SMALL[0] * 2)
    else:
        assert images[0].shape[:2] == (SMALL[1], SMALL[0])


def test_sampling_sends_live_previews(server):
    """With --preview-method auto, SanaSampler's steps send preview images (Latent2RGB with Sana's constant map;
    TAESANA previews: test_comfyui_previews.py) over the websocket."""
    import websocket
    client_id = "sana-preview-test"
    ws = websocket.create_connection(f"ws://{server.url.split('//')[1]}/ws?clientId={client_id}", timeout=120)
    prompt = prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json", steps=5)
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

    prompt = prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json", steps=4)
    custom = prepare(server, ROOT / "workflows" / "sana_sampler_custom_advanced.json", steps=4)
    got = saved_images(server, server.run(prompt))
    got_custom = saved_images(server, server.run(custom))
    (engine_png,), (custom_png,) = got.values(), got_custom.values()
    pipe = SanaPipeline.from_pretrained(server.sana, torch_dtype=torch.float32, device="cpu")
    texts = prompt_texts(prompt)
    want = pipe(texts["positive"], negative_prompt=texts["negative"], seed=42, num_inference_steps=4,
                width=SMALL[0], height=SMALL[1], output_type="pt", progress=False)
    want = (want[0].permute(1, 2, 0).numpy() * 255).astype(np.int16)
    assert np.abs(engine_png[0].astype(np.int16) - want).max() <= 1
    assert np.abs(custom_png[0].astype(np.int16) - engine_png[0].astype(np.int16)).max() <= 1


@pytest.mark.parametrize("file,message", [
    ("sana_e2e_sdxl_unet.safetensors", "not a Sana DiT checkpoint: it looks like a Stable Diffusion / SDXL UNet"),
    ("sana_e2e_gemma_in_dit_slot.safetensors", "not a Sana DiT checkpoint: it looks like a language model"),
    ("sana_e2e_missing.safetensors", "'sana_e2e_missing.safetensors' is not in any of the model folders"),
])
def test_wrong_model_files_are_node_errors(server, file, message):
    prompt = prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json")
    loader = next(k for k, n in prompt.items() if n["class_type"] == "SanaCheckpointLoader")
    prompt[loader]["inputs"]["ckpt_name"] = file
    entry = server.run(prompt)
    error = error_of(entry)
    assert error and error["node_type"] == "SanaCheckpointLoader" and message in error["exception_message"]


@pytest.mark.parametrize("kind,lora,strength_input", [
    ("LoraLoaderModelOnly", "sana_e2e_lora_comfy_keys.safetensors", "strength_model"),  # our module names, core node
    ("SanaLoraLoader", "sana_e2e_lora_diffusers.safetensors", "strength"),    # PEFT names into fused qkv / kv
])
def test_lora_loaders_patch_our_model(server, kind, lora, strength_input):
    """A LoRA loader on our MODEL: strength 0 gives the plain image, strength 1 another one."""
    images = []
    for strength in (0.0, 1.0):
        prompt = prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json")
        sampler = next(k for k, n in prompt.items() if n["class_type"] == "SanaSampler")
        prompt["lora"] = {"class_type": kind, "inputs": {
            "model": prompt[sampler]["inputs"]["model"], "lora_name": lora, strength_input: strength}}
        prompt[sampler]["inputs"]["model"] = ["lora", 0]
        entry = server.run(prompt)
        assert entry["status"]["status_str"] == "success", error_of(entry)
        images.append(next(iter(saved_images(server, entry).values()))[0].astype(np.int16))
    plain = next(iter(saved_images(server, server.run(prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json"))).values()))[0]
    assert np.abs(images[0] - plain).max() <= 1
    assert np.abs(images[1] - plain).max() > 10


@pytest.mark.parametrize("workflow", ["sana_text_to_image_1024.json", "sana_ksampler.json"])
def test_fp16_overflow_is_recomputed_wider(server, workflow):
    """A DiT computing in float16 (core ModelComputeDtype on fp16 weights) that overflows finishes (SanaSampler and
    core KSampler), computing in bfloat16 from the overflowing step on, with a warning; the image equals the
    bfloat16 run of the same weights."""
    images = []
    for dtype in ("fp16", "bf16"):
        prompt = prepare(server, ROOT / "workflows" / workflow)
        loader = node(prompt, "SanaCheckpointLoader")
        prompt[loader]["inputs"].update(ckpt_name="sana_e2e_fp16_overflow.safetensors", weight_dtype="fp16")
        for n in prompt.values():
            if n["inputs"].get("model") == [loader, 0]:
                n["inputs"]["model"] = ["compute", 0]
        add(prompt, "compute", "ModelComputeDtype", model=[loader, 0], dtype=dtype)
        images.append(next(iter(run_images(server, prompt).values())))
    assert np.abs(images[0] - images[1]).max() <= 1
    assert "overflowed in float16 (inf/NaN); computing in torch.bfloat16" in (server.root / "comfy.log").read_text()


def test_unchanged_prompt_reuses_loaded_models(server):
    prompt = prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json")
    server.run(prompt)
    entry = server.run(prompt)
    cached = next(data["nodes"] for kind, data in entry["status"]["messages"] if kind == "execution_cached")
    loaders = {k for k, n in prompt.items() if n["class_type"].endswith("Loader")}
    assert loaders <= set(cached)


def test_size_not_multiple_of_32_is_refused(server):
    prompt = prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json")
    latent = next(k for k, n in prompt.items() if n["class_type"] == "SanaEmptyLatentImage")
    prompt[latent]["inputs"]["width"] = 200
    code, answer = server.queue(prompt)
    assert code == 400
    assert "multiples of 32" in json.dumps(answer["node_errors"][latent])


def test_cancel_then_next_prompt_runs(server):
    slow = prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json", steps=200)
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
    good = server.run(prepare(server, ROOT / "workflows" / "sana_text_to_image_1024.json"))
    assert good["status"]["status_str"] == "success"


def test_frontend_loads_every_workflow_and_the_widgets_work(server):
    """Headless Chromium on the real frontend (needs node, playwright-core in PLAYWRIGHT_CORE or on the node
    path, and Chromium in CHROMIUM or /usr/bin/chromium): no bundled workflow has a missing node, the
    frontend's own API prompt equals our converter's, the presets set width/height, sizes snap to 32."""
    import shutil

    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not shutil.which("node") or not os.path.exists(chromium):
        unavailable("node and Chromium are needed for the frontend check")
    out = subprocess.run(["node", str(ROOT / "tests" / "frontend_check.cjs"), server.url, *map(str, WORKFLOWS)],
                         capture_output=True, text=True, timeout=300)
    if "Cannot find module" in out.stderr:
        unavailable("playwright-core is not installed (set PLAYWRIGHT_CORE)")
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











def test_core_vae_nodes_work_on_the_dcae(server):
    """The DC-AE loader's VAE in core VAEDecode (= SanaDCAEDecode), VAEDecodeTiled, VAEEncode (= SanaDCAEEncode)."""
    p = prepare(server, T2I)
    sampler, vae, decode = (node(p, k) for k in ("SanaSampler", "SanaDCAELoader", "SanaDCAEDecode"))
    p[decode]["inputs"]["tiling"] = "off"
    core = add(p, "core_decode", "VAEDecode", samples=[sampler, 0], vae=[vae, 0])
    tiled = add(p, "core_tiled", "VAEDecodeTiled", samples=[sampler, 0], vae=[vae, 0], tile_size=128, overlap=32,
                 temporal_size=64, temporal_overlap=8)
    enc_core = add(p, "enc_core", "VAEEncode", pixels=[decode, 0], vae=[vae, 0])
    enc_ours = add(p, "enc_ours", "SanaDCAEEncode", pixels=[decode, 0], dcae=[vae, 0], tiling="off")
    for name, src in (("a_core", core), ("a_tiled", tiled),
                      ("b_core", add(p, "dec_core", "VAEDecode", samples=enc_core, vae=[vae, 0])),
                      ("b_ours", add(p, "dec_ours", "SanaDCAEDecode", samples=enc_ours, dcae=[vae, 0], tiling="off",
                                      tile_size=0, overlap=256))):
        save(p, name, src)
    got = run_images(server, p)
    ours = next(v for k, v in got.items() if k not in ("a_core", "a_tiled", "b_core", "b_ours"))
    assert np.abs(got["a_core"] - ours).max() <= 1
    assert np.abs(got["b_core"] - got["b_ours"]).max() <= 1
    assert got["a_tiled"].shape == ours.shape and np.abs(got["a_tiled"] - ours).mean() < 40


def _latest_latent(server, prefix: str) -> torch.Tensor:
    from safetensors.torch import load_file

    path = sorted((server.root / "output").glob(f"{prefix}_0*.latent"))[-1]
    return load_file(str(path))["latent_tensor"]


def _masked_region(a: np.ndarray, b: np.ndarray, margin: int) -> tuple[float, float]:
    """Mean |a - b| inside the masked rectangle and outside it (at least `margin` px away)."""
    x0, y0, x1, y1 = MASKED
    inside = np.zeros(a.shape[:2], bool)
    inside[y0:y1, x0:x1] = True
    far = np.ones(a.shape[:2], bool)
    far[max(0, y0 - margin):y1 + margin, max(0, x0 - margin):x1 + margin] = False
    diff = np.abs(a - b).mean(-1)
    return float(diff[inside].mean()), float(diff[far].mean())


def test_inpainting_with_a_noise_mask(server):
    """SetLatentNoiseMask -> SanaSampler regenerates only the masked latent pixels: outside the mask the image is
    the DC-AE round trip of the input, inside it changes; SanaSampler equals SamplerCustomAdvanced with core
    euler on the same mask (flow_euler is Euler), and VAEEncodeForInpaint + KSampler keeps the outside too."""
    p = prepare(server, T2I, steps=4)
    sampler, vae, decode = (node(p, k) for k in ("SanaSampler", "SanaDCAELoader", "SanaDCAEDecode"))
    image = add(p, "load", "LoadImage", image="sana_e2e_masked.png")
    latent = add(p, "encode", "VAEEncode", pixels=image, vae=[vae, 0])
    masked = add(p, "mask", "SetLatentNoiseMask", samples=latent, mask=["load", 1])
    p[sampler]["inputs"].update(latent_image=masked, sampler="flow_euler")
    save(p, "round_trip", add(p, "rt", "VAEDecode", samples=latent, vae=[vae, 0]))
    pos, neg = p[sampler]["inputs"]["positive"], p[sampler]["inputs"]["negative"]
    guider = add(p, "guider", "CFGGuider", model=p[sampler]["inputs"]["model"], positive=pos, negative=neg, cfg=4.5)
    custom = add(p, "custom", "SamplerCustomAdvanced", noise=add(p, "noise", "RandomNoise", noise_seed=42),
                  guider=guider, sampler=add(p, "euler", "KSamplerSelect", sampler_name="euler"),
                  sigmas=add(p, "sigmas", "SanaScheduler", sampler="flow_euler", steps=4, shift=0.0, denoise=1.0,
                              model=p[sampler]["inputs"]["model"]), latent_image=masked)
    save(p, "custom", add(p, "custom_decode", "VAEDecode", samples=custom, vae=[vae, 0]))
    inpaint = add(p, "for_inpaint", "VAEEncodeForInpaint", pixels=image, vae=[vae, 0], mask=["load", 1], grow_mask_by=0)
    ks = add(p, "ks", "KSampler", model=p[sampler]["inputs"]["model"], positive=pos, negative=neg,
              latent_image=inpaint, seed=1, steps=4, cfg=4.5, sampler_name="euler", scheduler="simple", denoise=1.0)
    save(p, "ksampler", add(p, "ks_decode", "VAEDecode", samples=ks, vae=[vae, 0]))
    for name, src in (("input", latent), ("sana", [sampler, 0]), ("kstart", inpaint), ("ks", ks)):
        add(p, f"latent_{name}", "SaveLatent", samples=src, filename_prefix=f"e2e_inpaint_{name}")
    got = run_images(server, p)
    ours = next(v for k, v in got.items() if k not in ("round_trip", "custom", "ksampler"))
    assert np.abs(ours - got["custom"]).max() <= 2
    x0, y0, x1, y1 = (v // 32 for v in MASKED)
    z = {name: _latest_latent(server, f"e2e_inpaint_{name}") for name in ("input", "sana", "kstart", "ks")}
    keep = torch.ones(z["input"].shape[-2:], dtype=torch.bool)
    keep[y0:y1, x0:x1] = False
    for name, start in (("sana", "input"), ("ks", "kstart")):  # outside the mask: the input latent; inside: new
        assert torch.allclose(z[name][..., keep], z[start][..., keep], atol=1e-5), name
        assert (z[name][..., ~keep] - z[start][..., ~keep]).abs().mean() > 0.1, name
    inside, outside = _masked_region(ours, got["round_trip"], margin=32)
    print(f"inpainting, decoded: mean |diff| to the DC-AE round trip of the input: inside the mask {inside:.2f}, "
          f"outside {outside:.2f} (of 255; the tiny random DC-AE's global attention spreads changes)")
    assert inside > outside


def _with_shift_node(p: dict, sampler: str, kind: str, shift: float) -> None:
    add(p, "shift_node", kind, model=p[sampler]["inputs"]["model"], shift=shift)
    p[sampler]["inputs"]["model"] = ["shift_node", 0]


@pytest.mark.parametrize("kind", ["ModelSamplingSD3", "ModelSamplingAuraFlow"])
def test_shift_nodes_give_the_same_images_as_the_shift(server, kind):
    """ModelSamplingSD3 / AuraFlow (multiplier 1000 / 1) on a Sana model: SanaSampler (shift 0 = the model's)
    equals SanaSampler's own shift; KSampler with the node at the default shift equals KSampler without it."""
    images = []
    for with_node in (False, True):
        p = prepare(server, T2I)
        sampler = node(p, "SanaSampler")
        if with_node:
            _with_shift_node(p, sampler, kind, 5.0)
        else:
            p[sampler]["inputs"]["shift"] = 5.0
        images.append(next(iter(run_images(server, p).values())))
    assert np.abs(images[0] - images[1]).max() <= 1
    ks = []
    for with_node in (False, True):
        p = prepare(server, ROOT / "workflows" / "sana_ksampler.json")
        sampler = node(p, "KSampler")
        if with_node:
            _with_shift_node(p, sampler, kind, 3.0)
        ks.append(next(iter(run_images(server, p).values())))
    assert np.abs(ks[0] - ks[1]).max() <= 1


def test_sprint_under_a_shift_node_keeps_its_timestep(server):
    """ModelSamplingSD3 (multiplier 1000) at Sprint's own shift 1 on a Sprint model: the same image (the DiT still
    gets Sprint's sigma timestep, not 1000 * sigma)."""
    images = []
    for with_node in (False, True):
        p = prepare(server, ROOT / "workflows" / "sana_sprint_2_steps.json")
        sampler = node(p, "SanaSampler")
        p[sampler]["inputs"]["sampler"] = "flow_euler"
        if with_node:
            _with_shift_node(p, sampler, "ModelSamplingSD3", 1.0)
        images.append(next(iter(run_images(server, p).values())))
    assert np.abs(images[0] - images[1]).max() <= 1


def test_inpaint_model_conditioning_with_both_samplers(server):
    """Core InpaintModelConditioning on our VAE: SanaSampler and KSampler keep the latent outside the mask (its
    concat image is not used by Sana, which says so in the console)."""
    p = prepare(server, T2I, steps=3)
    sampler, vae = node(p, "SanaSampler"), node(p, "SanaDCAELoader")
    inputs = p[sampler]["inputs"]
    image = add(p, "load", "LoadImage", image="sana_e2e_masked.png")
    add(p, "imc", "InpaintModelConditioning", positive=inputs["positive"], negative=inputs["negative"],
         vae=[vae, 0], pixels=image, mask=["load", 1], noise_mask=True)
    inputs.update(positive=["imc", 0], negative=["imc", 1], latent_image=["imc", 2])
    ks = add(p, "ks", "KSampler", model=inputs["model"], positive=["imc", 0], negative=["imc", 1],
              latent_image=["imc", 2], seed=1, steps=3, cfg=4.5, sampler_name="euler", scheduler="simple", denoise=1.0)
    for name, src in (("start", ["imc", 2]), ("sana", [sampler, 0]), ("ks", ks)):
        add(p, f"latent_{name}", "SaveLatent", samples=src, filename_prefix=f"e2e_imc_{name}")
    run_images(server, p)
    z = {name: _latest_latent(server, f"e2e_imc_{name}") for name in ("start", "sana", "ks")}
    x0, y0, x1, y1 = (v // 32 for v in MASKED)
    keep = torch.ones(z["start"].shape[-2:], dtype=torch.bool)
    keep[y0:y1, x0:x1] = False
    for name in ("sana", "ks"):
        assert torch.allclose(z[name][..., keep], z["start"][..., keep], atol=1e-5), name
        assert (z[name][..., ~keep] - z["start"][..., ~keep]).abs().mean() > 0.1, name
    assert "Sana has no inpainting model, so only the latent's noise mask is used" in \
        (server.root / "comfy.log").read_text()


def test_shift_combinations_that_make_no_sense_are_errors(server):
    p = prepare(server, ROOT / "workflows" / "sana_sprint_2_steps.json")
    sampler = node(p, "SanaSampler")
    _with_shift_node(p, sampler, "ModelSamplingSD3", 3.0)
    error = error_of(server.run(p))
    assert error and "scm sampler (Sana-Sprint)" in error["exception_message"]
    p = prepare(server, T2I)
    sampler = node(p, "SanaSampler")
    add(p, "eps", "ModelSamplingDiscrete", model=p[sampler]["inputs"]["model"], sampling="eps", zsnr=False)
    p[sampler]["inputs"]["model"] = ["eps", 0]
    error = error_of(server.run(p))
    assert error and "Sana is a flow-matching model" in error["exception_message"]


def test_pag_under_any_sampler_equals_the_engine(server):
    """SanaSampler's PAG = the engine's SanaPAGPipeline-equivalent run; SanaPAG + CFGGuider +
    SamplerCustomAdvanced (what KSampler users wire) = SanaSampler's PAG; core's UNet PAG node is refused."""
    from sana_core.pipeline import SanaPipeline

    p = prepare(server, T2I, steps=3)
    sampler = node(p, "SanaSampler")
    p[sampler]["inputs"].update(pag_scale=2.0, pag_layers="1")
    inputs = p[sampler]["inputs"]
    pag_model = add(p, "pag", "SanaPAG", model=inputs["model"], scale=2.0, layers="1")
    guider = add(p, "guider", "CFGGuider", model=pag_model, positive=inputs["positive"], negative=inputs["negative"],
                  cfg=4.5)
    custom = add(p, "custom", "SamplerCustomAdvanced", noise=add(p, "noise", "RandomNoise", noise_seed=42),
                  guider=guider, sampler=add(p, "select", "SanaSamplerSelect", sampler="flow_dpmpp_2m"),
                  sigmas=add(p, "sigmas", "SanaScheduler", sampler="flow_dpmpp_2m", steps=3, shift=0.0,
                              denoise=1.0, model=pag_model), latent_image=inputs["latent_image"])
    save(p, "custom", add(p, "custom_decode", "VAEDecode", samples=custom, vae=[node(p, "SanaDCAELoader"), 0]))
    got = run_images(server, p)
    ours = next(v for k, v in got.items() if k != "custom")
    assert np.abs(ours - got["custom"]).max() <= 1
    pipe = SanaPipeline.from_pretrained(server.sana, torch_dtype=torch.float32, device="cpu")
    texts = prompt_texts(p)
    want = pipe(texts["positive"], negative_prompt=texts["negative"], seed=42, num_inference_steps=3, width=SMALL[0],
                height=SMALL[1], pag_guidance_scale=2.0, pag_layers=(1,), output_type="pt", progress=False)
    want = (want[0].permute(1, 2, 0).numpy() * 255).astype(np.int16)
    assert np.abs(ours - want).max() <= 1
    p = prepare(server, T2I)
    sampler = node(p, "SanaSampler")
    add(p, "core_pag", "PerturbedAttentionGuidance", model=p[sampler]["inputs"]["model"], scale=3.0)
    p[sampler]["inputs"]["model"] = ["core_pag", 0]
    error = error_of(server.run(p))
    assert error and "cannot apply to Sana's blocks" in error["exception_message"]


@pytest.mark.parametrize("kind,widgets", [
    ("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0}),
    ("HyperTile", {"tile_size": 256, "swap_size": 2, "max_depth": 0, "scale_depth": False}),
    ("TomePatchModel", {"ratio": 0.3}),
    ("PatchModelAddDownscale", {"block_number": 3, "downscale_factor": 2.0, "start_percent": 0.0, "end_percent": 0.35,
                                "downscale_after_skip": True, "downscale_method": "bicubic",
                                "upscale_method": "bicubic"}),
    ("FreeU", {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2}),
    ("FreeU_V2", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}),
])
def test_unet_block_patches_are_refused_naming_sana_pag(server, kind, widgets):
    """Core's UNet attention/block patch nodes on a Sana model: an error naming Sana's blocks and SanaPAG (their
    patches would not be applied)."""
    p = prepare(server, T2I, steps=1)
    sampler = node(p, "SanaSampler")
    p[sampler]["inputs"]["model"] = add(p, "patch", kind, model=p[sampler]["inputs"]["model"], **widgets)
    error = error_of(server.run(p))
    assert error and "cannot apply to Sana's blocks (use SanaPAG" in error["exception_message"], error


def test_area_conditioning_acts_on_its_area(server):
    """ConditioningSetArea in pixels (moved to Sana's 1/32 grid) and ConditioningSetAreaPercentage on the same
    area give the same image; in one step (the x0 of the first prediction) the latent outside the area is the
    first prompt's alone and inside it the second prompt acts."""
    p = prepare(server, T2I, steps=1)
    sampler = node(p, "SanaSampler")
    pos = p[sampler]["inputs"]["positive"]
    other = add(p, "other", "CLIPTextEncode", clip=[node(p, "SanaGemmaLoader"), 0],
                text="a completely different prompt")
    w, h = SMALL
    areas = {"pixels": add(p, "area_px", "ConditioningSetArea", conditioning=other, width=w // 2, height=h, x=0, y=0,
                           strength=1.0),
             "percent": add(p, "area_pc", "ConditioningSetAreaPercentage", conditioning=other, width=0.5, height=1.0,
                            x=0.0, y=0.0, strength=1.0)}
    latents = {"plain": [sampler, 0]}
    for name, area in areas.items():
        combined = add(p, f"both_{name}", "ConditioningCombine", conditioning_1=pos, conditioning_2=area)
        latents[name] = add(p, f"sample_{name}", "SanaSampler", **{**p[sampler]["inputs"], "positive": combined})
    for name, link in latents.items():
        add(p, f"latent_{name}", "SaveLatent", samples=link, filename_prefix=f"e2e_area_{name}")
    run_images(server, p)
    z = {name: _latest_latent(server, f"e2e_area_{name}") for name in latents}
    assert torch.allclose(z["pixels"], z["percent"], atol=1e-5)
    half = w // 64  # the area's latent columns
    assert torch.allclose(z["pixels"][..., half:], z["plain"][..., half:], atol=1e-4)
    assert (z["pixels"][..., :half] - z["plain"][..., :half]).abs().mean() > 0.5


@pytest.mark.parametrize("field,value,kind", [("cfg", float("nan"), "SanaSampler"), ("shift", float("inf"), "SanaSampler"),
                                              ("denoise", float("nan"), "SanaSampler"), ("width", 0, "SanaEmptyLatentImage"),
                                              ("batch_size", 0, "SanaEmptyLatentImage"), ("pag_scale", -1.0, "SanaSampler")])
def test_bad_numbers_are_refused_naming_the_field(server, field, value, kind):
    p = prepare(server, T2I)
    target = node(p, kind)
    p[target]["inputs"][field] = value
    code, answer = server.queue(p)
    assert code == 400
    errors = json.dumps(answer["node_errors"][target])
    assert f"{field}:" in errors or f'"{field}"' in errors


def test_long_prompt_says_it_was_cut(server):
    p = prepare(server, T2I)
    encoder = p[node(p, "SanaSampler")]["inputs"]["positive"][0]
    p[encoder]["inputs"]["text"] = " ".join(f"word{i}" for i in range(400))
    assert server.run(p)["status"]["status_str"] == "success"
    assert "is longer than Sana reads (max_length 300 tokens)" in (server.root / "comfy.log").read_text()


def test_flux_guidance_on_a_model_without_guidance_embedder_warns(server):
    """FluxGuidance on a (non-Sprint) Sana model cannot act (no guidance embedder): the console says so."""
    p = prepare(server, T2I, steps=1)
    sampler = node(p, "SanaSampler")
    p[sampler]["inputs"]["positive"] = add(p, "flux", "FluxGuidance", conditioning=p[sampler]["inputs"]["positive"],
                                           guidance=3.5)
    assert server.run(p)["status"]["status_str"] == "success"
    assert "carries a guidance 3.5 (FluxGuidance), but this Sana model has no guidance embedder" in (
        server.root / "comfy.log").read_text()


def test_fp8_storage_runs_and_matches_fp32(server):
    images = []
    for dtype in ("fp8_e4m3fn", "fp32"):
        p = prepare(server, T2I)
        p[node(p, "SanaCheckpointLoader")]["inputs"]["weight_dtype"] = dtype
        images.append(next(iter(run_images(server, p).values())))
    assert images[0].std() > 1 and np.abs(images[0] - images[1]).mean() < 20


def test_cancel_during_a_tiled_decode(server):
    """POST /interrupt during a long tiled DC-AE decode stops it within about a second."""
    p = {"latent": {"class_type": "SanaEmptyLatentImage", "inputs": {"width": 4096, "height": 4096, "batch_size": 1}},
         "vae": {"class_type": "SanaDCAELoader", "inputs": {"vae_name": "sana_e2e_tiny/", "dtype": "fp32"}},
         "decode": {"class_type": "SanaDCAEDecode", "inputs": {"samples": ["latent", 0], "dcae": ["vae", 0],
                                                              "tiling": "on", "tile_size": 256, "overlap": 64}},
         "save": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}}}
    code, answer = server.queue(p)
    assert code == 200
    for _ in range(600):
        _, queue = server.request("GET", "/queue")
        if queue["queue_running"]:
            break
        time.sleep(0.1)
    time.sleep(3.0)
    asked = time.time()
    server.request("POST", "/interrupt")
    entry = server.wait(answer["prompt_id"], timeout=120)
    stopped = next(data["timestamp"] for kind, data in entry["status"]["messages"] if kind == "execution_interrupted")
    latency = stopped / 1000 - asked
    print(f"cancel latency during a tiled decode: {latency:.2f} s")
    assert latency < 1.5


def test_sana_lora_loader_reads_comfyui_trainer_keys(server):
    images = []
    for strength in (0.0, 1.0):
        p = prepare(server, T2I)
        sampler = node(p, "SanaSampler")
        add(p, "lora", "SanaLoraLoader", model=p[sampler]["inputs"]["model"],
             lora_name="sana_e2e_lora_comfy_keys.safetensors", strength=strength)
        p[sampler]["inputs"]["model"] = ["lora", 0]
        images.append(next(iter(run_images(server, p).values())))
    assert np.abs(images[0] - images[1]).max() > 10


CONTROL = ROOT / "workflows" / "sana_controlnet_scribble.json"


def _control_prompt(server, steps: int = 3, strength: float = 0.8) -> dict:
    """The ControlNet workflow with the scribble at the test size as the hint (no Canny), PAG off."""
    p = prepare(server, CONTROL, steps=steps)
    photo, apply_ = node(p, "LoadImage"), node(p, "ControlNetApplyAdvanced")
    p[photo]["inputs"]["image"] = "sana_e2e_scribble.png"
    p[apply_]["inputs"].update(image=[photo, 0], strength=strength)
    p[node(p, "SanaSampler")]["inputs"].update(pag_scale=0.0, seed=7)
    for kind in ("Canny", "ImageScale", "PreviewImage"):
        del p[node(p, kind)]
    return p


def test_apply_controlnet_under_sana_sampler_equals_the_engine(server):
    """The released layout (base + branch in one .pth, loaded by both loaders) through core Apply ControlNet
    (Advanced) = the engine's pipe(control_image=...) on the same files and seed."""
    from PIL import Image

    from sana_core.pipeline import SanaPipeline

    p = _control_prompt(server)
    (got,) = saved_images(server, server.run(p)).values()
    release = server.root / "models" / "controlnet" / "sana_e2e_ControlNet_HED.pth"
    pipe = SanaPipeline.from_pretrained(server.deep, dit=release, controlnet=release, torch_dtype=torch.float32,
                                        device="cpu")
    texts = prompt_texts(p)
    hint = Image.open(server.root / "input" / "sana_e2e_scribble.png")
    want = pipe(texts["positive"], negative_prompt=texts["negative"], seed=7, num_inference_steps=3, width=SMALL[0],
                height=SMALL[1], control_image=hint, controlnet_conditioning_scale=0.8, output_type="pt",
                progress=False)
    want = (want[0].permute(1, 2, 0).numpy() * 255).astype(np.int16)
    assert np.abs(got[0].astype(np.int16) - want).max() <= 1
    plain = pipe(texts["positive"], negative_prompt=texts["negative"], seed=7, num_inference_steps=3,
                 width=SMALL[0], height=SMALL[1], control_image=hint, controlnet_conditioning_scale=0.0,
                 output_type="pt", progress=False)
    assert np.abs((plain[0].permute(1, 2, 0).numpy() * 255) - want).mean() > 1  # the ControlNet acts


def test_controlnet_ranges_chaining_and_core_samplers(server):
    """Start/end percent and chaining change the image as expected; KSampler and SamplerCustomAdvanced run it."""
    p = _control_prompt(server, steps=4)
    apply_, sampler = node(p, "ControlNetApplyAdvanced"), node(p, "SanaSampler")
    decode = node(p, "VAEDecode")
    cond = p[apply_]["inputs"]
    variants = {"full": {}, "none": {"strength": 0.0}, "late": {"start_percent": 0.5}, "early": {"end_percent": 0.4}}
    for name, change in variants.items():
        nid = add(p, f"apply_{name}", "ControlNetApplyAdvanced", **{**cond, **change})[0]
        s = add(p, f"sampler_{name}", "SanaSampler", **{**p[sampler]["inputs"], "positive": [nid, 0],
                                                          "negative": [nid, 1]})
        save(p, name, add(p, f"decode_{name}", "VAEDecode", samples=s, vae=p[decode]["inputs"]["vae"]))
    # two ControlNets on one hint at half strength each = one at full strength (core's chaining)
    half = add(p, "half_1", "ControlNetApplyAdvanced", **{**cond, "strength": cond["strength"] / 2})
    second = add(p, "loader_2", "SanaControlNetLoader", control_net_name="sana_e2e_ControlNet_HED.pth",
                  weight_dtype="default")
    chained = add(p, "half_2", "ControlNetApplyAdvanced", **{**cond, "strength": cond["strength"] / 2,
                                                               "positive": [half[0], 0], "negative": [half[0], 1],
                                                               "control_net": second})
    s = add(p, "sampler_chain", "SanaSampler", **{**p[sampler]["inputs"], "positive": [chained[0], 0],
                                                  "negative": [chained[0], 1]})
    save(p, "chain", add(p, "decode_chain", "VAEDecode", samples=s, vae=p[decode]["inputs"]["vae"]))
    # another ControlNet file chained: acts differently
    other = add(p, "loader_b", "SanaControlNetLoader", control_net_name="sana_e2e_ControlNet_B.pth",
                 weight_dtype="default")
    both = add(p, "both", "ControlNetApplyAdvanced", **{**cond, "positive": [apply_, 0], "negative": [apply_, 1],
                                                         "control_net": other})
    s = add(p, "sampler_both", "SanaSampler", **{**p[sampler]["inputs"], "positive": [both[0], 0],
                                                 "negative": [both[0], 1]})
    save(p, "both", add(p, "decode_both", "VAEDecode", samples=s, vae=p[decode]["inputs"]["vae"]))
    # core samplers on the controlled conditioning
    ks = add(p, "ks", "KSampler", model=p[sampler]["inputs"]["model"], positive=[apply_, 0], negative=[apply_, 1],
              latent_image=p[sampler]["inputs"]["latent_image"], seed=7, steps=4, cfg=4.5, sampler_name="euler",
              scheduler="simple", denoise=1.0)
    save(p, "ksampler", add(p, "decode_ks", "VAEDecode", samples=ks, vae=p[decode]["inputs"]["vae"]))
    ks_plain = add(p, "ks_plain", "KSampler", **{**p["ks"]["inputs"], "positive": p[apply_]["inputs"]["positive"],
                                                  "negative": p[apply_]["inputs"]["negative"]})
    save(p, "ksampler_plain", add(p, "decode_ksp", "VAEDecode", samples=ks_plain, vae=p[decode]["inputs"]["vae"]))
    guider = add(p, "guider", "CFGGuider", model=p[sampler]["inputs"]["model"], positive=[apply_, 0],
                  negative=[apply_, 1], cfg=4.5)
    custom = add(p, "custom", "SamplerCustomAdvanced", noise=add(p, "noise", "RandomNoise", noise_seed=7),
                  guider=guider, sampler=add(p, "select", "SanaSamplerSelect", sampler="flow_dpmpp_2m"),
                  sigmas=add(p, "sigmas", "SanaScheduler", sampler="flow_dpmpp_2m", steps=4, shift=0.0, denoise=1.0,
                              model=p[sampler]["inputs"]["model"]), latent_image=p[sampler]["inputs"]["latent_image"])
    save(p, "custom", add(p, "decode_custom", "VAEDecode", samples=custom, vae=p[decode]["inputs"]["vae"]))
    got = run_images(server, p)
    diff = lambda a, b: np.abs(got[a] - got[b]).mean()
    assert diff("full", "none") > 1
    for part in ("late", "early"):
        assert diff(part, "full") > 0.2 and diff(part, "none") > 0.2, part
    assert np.abs(got["chain"] - got["full"]).max() <= 2
    assert diff("both", "full") > 0.2
    assert diff("ksampler", "ksampler_plain") > 1
    assert np.abs(got["custom"] - got["full"]).max() <= 2  # SamplerCustomAdvanced = SanaSampler


@pytest.mark.parametrize("change,kind,message", [
    ({"control_net_name": "sana_e2e_sd15_controlnet.safetensors"}, "SanaControlNetLoader",
     "not a Sana ControlNet: it looks like a Stable Diffusion ControlNet"),
    ({"control_net_name": "sana_e2e_ControlNet_wide.safetensors"}, "SanaSampler",
     "a ControlNet of width 96 cannot drive this DiT of width 64: use the ControlNet released for that model"),
    ({"no_vae": True}, "ControlNetApplyAdvanced", "connect a Sana VAE to the vae input of Apply ControlNet"),
])
def test_controlnet_errors_name_the_input(server, change, kind, message):
    p = _control_prompt(server, steps=2)
    if change.pop("no_vae", False):
        del p[node(p, "ControlNetApplyAdvanced")]["inputs"]["vae"]
    p[node(p, "SanaControlNetLoader")]["inputs"].update(change)
    error = error_of(server.run(p))
    assert error and error["node_type"] == kind and message in error["exception_message"], error


def test_old_apply_controlnet_uses_the_loaders_vae(server):
    """ControlNetApply (no vae input) works when SanaControlNetLoader was given the DC-AE."""
    p = _control_prompt(server, steps=2)
    apply_, loader = node(p, "ControlNetApplyAdvanced"), node(p, "SanaControlNetLoader")
    p[loader]["inputs"]["vae"] = p[apply_]["inputs"].pop("vae")
    inputs = p[apply_]["inputs"]
    pos = add(p, "old_apply", "ControlNetApply", conditioning=inputs["positive"], control_net=inputs["control_net"],
               image=inputs["image"], strength=inputs["strength"])
    sampler = node(p, "SanaSampler")
    p[sampler]["inputs"].update(positive=pos, cfg=1.0)  # one branch: the old node controls the positive only
    assert server.run(p)["status"]["status_str"] == "success"


def test_trained_lora_in_the_node_equals_the_engine(server):
    """A LoRA file as `python -m sana_core.train` saves it: SanaLoraLoader = the engine's pipe.load_lora."""
    from sana_core.pipeline import SanaPipeline

    p = prepare(server, T2I, steps=3)
    sampler = node(p, "SanaSampler")
    lora = add(p, "lora", "SanaLoraLoader", model=p[sampler]["inputs"]["model"],
                lora_name="sana_e2e_trained_lora.safetensors", strength=0.8)
    p[sampler]["inputs"]["model"] = lora
    (got,) = saved_images(server, server.run(p)).values()
    pipe = SanaPipeline.from_pretrained(server.sana, torch_dtype=torch.float32, device="cpu")
    pipe.load_lora(server.root / "models" / "loras" / "sana_e2e_trained_lora.safetensors", 0.8)
    texts = prompt_texts(p)
    want = pipe(texts["positive"], negative_prompt=texts["negative"], seed=42, num_inference_steps=3, width=SMALL[0],
                height=SMALL[1], output_type="pt", progress=False)
    want = (want[0].permute(1, 2, 0).numpy() * 255).astype(np.int16)
    assert np.abs(got[0].astype(np.int16) - want).max() <= 1


def test_bundled_workflows_are_built_from_the_node_schemas(server):
    """Every bundled workflow is what workflows/build.py makes from the running host's node schemas (sockets,
    outputs, widget order): a renamed or retyped input fails here. SANA_WRITE_WORKFLOWS=1 rewrites the files."""
    build = workflow_builder()
    if os.environ.get("SANA_WRITE_WORKFLOWS"):
        build.write(server.info)
    assert sorted(f"{name}.json" for name in build.WORKFLOWS) == [w.name for w in WORKFLOWS]
    for name, make in build.WORKFLOWS.items():
        assert json.loads((ROOT / "workflows" / f"{name}.json").read_text()) == make(server.info).json(), name


LORAS = ["sana_e2e_lora_comfy_keys", "sana_e2e_lora_diffusers", "sana_e2e_lora_kohya", "sana_e2e_lora_nvlabs",
         "sana_e2e_trained_lora"]


def test_core_lora_loader_equals_sana_lora_loader_for_every_naming(server):
    """Core LoraLoaderModelOnly reads Sana LoRAs in every naming they come in (ComfyUI's, diffusers/PEFT, kohya,
    NVlabs, our trainer's) and gives SanaLoraLoader's image; each LoRA changes the image."""
    p = prepare(server, T2I)
    sampler, decode, vae = node(p, "SanaSampler"), node(p, "SanaDCAEDecode"), node(p, "SanaDCAELoader")
    base = p[sampler]["inputs"]["model"]
    save(p, "plain", [decode, 0])
    for i, lora in enumerate(LORAS):
        for kind, strength in (("LoraLoaderModelOnly", "strength_model"), ("SanaLoraLoader", "strength")):
            tag = f"{i}_{kind}"
            patched = add(p, f"lora_{tag}", kind, model=base, lora_name=f"{lora}.safetensors", **{strength: 0.7})
            latent = add(p, f"sample_{tag}", "SanaSampler", **{**p[sampler]["inputs"], "model": patched})
            save(p, tag, add(p, f"decode_{tag}", "VAEDecode", samples=latent, vae=[vae, 0]))
    got = run_images(server, p)
    for i, lora in enumerate(LORAS):
        core, ours = got[f"{i}_LoraLoaderModelOnly"], got[f"{i}_SanaLoraLoader"]
        assert np.abs(core - ours).max() <= 1, lora
        assert np.abs(ours - got["plain"]).max() > 3, lora


def test_a_bad_lora_file_is_named(server):
    p = prepare(server, T2I)
    sampler = node(p, "SanaSampler")
    p[sampler]["inputs"]["model"] = add(p, "lora", "SanaLoraLoader", model=p[sampler]["inputs"]["model"],
                                        lora_name="sana_e2e_empty.safetensors", strength=1.0)
    error = error_of(server.run(p))
    assert error and error["node_type"] == "SanaLoraLoader"
    assert "sana_e2e_empty.safetensors: cannot be read as a LoRA" in error["exception_message"]


def test_model_merge_at_0_and_1_equals_each_model(server):
    """ModelMergeSimple reaches every weight (scale_shift_table included): ratio 1 is the first model, 0 the
    second."""
    p = prepare(server, T2I)
    sampler, loader, vae = node(p, "SanaSampler"), node(p, "SanaCheckpointLoader"), node(p, "SanaDCAELoader")
    other = add(p, "other", "SanaCheckpointLoader", ckpt_name="sana_e2e_other.safetensors", weight_dtype="default")
    for name, model in (("first", [loader, 0]), ("second", other),
                        ("ratio_1", add(p, "merge1", "ModelMergeSimple", model1=[loader, 0], model2=other, ratio=1.0)),
                        ("ratio_0", add(p, "merge0", "ModelMergeSimple", model1=[loader, 0], model2=other, ratio=0.0))):
        latent = add(p, f"sample_{name}", "SanaSampler", **{**p[sampler]["inputs"], "model": model})
        save(p, name, add(p, f"decode_{name}", "VAEDecode", samples=latent, vae=[vae, 0]))
    got = run_images(server, p)
    assert np.abs(got["first"] - got["second"]).mean() > 5
    assert np.abs(got["ratio_1"] - got["first"]).max() <= 1
    assert np.abs(got["ratio_0"] - got["second"]).max() <= 1


def _sampled(p: dict, name: str, **inputs) -> None:
    """A copy of the prompt's SanaSampler with `inputs` changed, its latent saved as e2e_cond_`name`."""
    latent = add(p, f"sample_{name}", "SanaSampler", **{**p[node(p, "SanaSampler")]["inputs"], **inputs})
    add(p, f"latent_{name}", "SaveLatent", samples=latent, filename_prefix=f"e2e_cond_{name}")


@functools.cache
def _tiny_engine(folder: Path):
    """One float32 engine pipeline on the tiny Sana folder for the conditioning tests, which never change it (its
    text encoder keeps the instruction's encoding between them)."""
    from sana_core.pipeline import SanaPipeline

    return SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")


def _engine_latent(pipe, steps: int, **kwargs) -> torch.Tensor:
    """The engine's latent (as a LATENT holds it: unscaled) at the test size, seed 42 (SanaSampler's in `prepare`);
    latents, not decoded images, keep these tests short (a DC-AE decode costs more than the tiny DiT's steps)."""
    out = pipe(seed=42, num_inference_steps=steps, width=SMALL[0], height=SMALL[1], output_type="latent",
               progress=False, **kwargs)
    return out / pipe.vae.cfg.scaling_factor


def _two_prompts(server, steps: int) -> tuple[dict, dict, dict]:
    """The text-to-image prompt (its SanaSampler's latent saved as "a", not decoded), its {"positive", "negative"}
    texts, and a second pair encoded by core CLIPTextEncode (positive) and SanaGemmaTextEncode (negative) of other
    lengths, as {"pos", "neg"} links."""
    p = prepare(server, T2I, steps=steps)
    for kind in ("SaveImage", "SanaDCAEDecode"):
        del p[node(p, kind)]
    add(p, "latent_a", "SaveLatent", samples=[node(p, "SanaSampler"), 0], filename_prefix="e2e_cond_a")
    clip = [node(p, "SanaGemmaLoader"), 0]
    texts = prompt_texts(p)
    second = {"positive": "a bird", "negative": "grainy, dull colours, cropped, duplicate, out of frame"}
    links = {"pos": add(p, "pos_b", "CLIPTextEncode", clip=clip, text=second["positive"]),
             "neg": add(p, "neg_b", "SanaGemmaTextEncode", gemma=clip, text=second["negative"], role="negative")}
    return p, {"a": texts, "b": second}, links


def test_conditioning_concat_and_average_equal_the_engine_on_both_sides(server):
    """ConditioningConcat / ConditioningAverage of two Sana prompts mean what they mean for core models, as a
    positive (complex-human-instruction encodings) and as a negative (plain encodings) alike: concat = the engine
    given both prompts' tokens (both masks); average at strength 1 / 0 = each prompt's image, at 0.5 = the engine
    given the averaged tokens, attended wherever either prompt has one (core kept the first prompt's mask only)."""
    p, texts, b = _two_prompts(server, steps=2)
    sampler = node(p, "SanaSampler")
    pos, neg = p[sampler]["inputs"]["positive"], p[sampler]["inputs"]["negative"]
    cat = lambda name, to, source: add(p, name, "ConditioningConcat", conditioning_to=to, conditioning_from=source)
    avg = lambda name, to, source, s: add(p, name, "ConditioningAverage", conditioning_to=to,
                                          conditioning_from=source, conditioning_to_strength=s)
    _sampled(p, "concat", positive=cat("cat_pos", pos, b["pos"]), negative=cat("cat_neg", neg, b["neg"]))
    _sampled(p, "b", positive=b["pos"], negative=b["neg"])
    _sampled(p, "at_1", positive=avg("avg_1", pos, b["pos"], 1.0), negative=avg("avg_1n", neg, b["neg"], 1.0))
    _sampled(p, "at_0", positive=avg("avg_0", pos, b["pos"], 0.0), negative=avg("avg_0n", neg, b["neg"], 0.0))
    _sampled(p, "half", positive=avg("avg_h", pos, b["pos"], 0.5), negative=avg("avg_hn", neg, b["neg"], 0.5))
    run_images(server, p)
    got = {name: _latest_latent(server, f"e2e_cond_{name}") for name in ("a", "b", "concat", "at_1", "at_0", "half")}
    assert torch.equal(got["at_1"], got["a"]) and torch.equal(got["at_0"], got["b"])
    assert (got["a"] - got["b"]).abs().mean() > 1
    pipe = _tiny_engine(server.sana)
    (ca, ua), (cb, ub) = (pipe.encode_prompt([t["positive"]], [t["negative"]]) for t in texts.values())
    assert ca.mask.sum() != cb.mask.sum() and ua.mask.sum() != ub.mask.sum()  # the masks matter
    joined = _engine_latent(pipe, 2, prompt_embeds=torch.cat([ca.embeds, cb.embeds], 1),
                           prompt_attention_mask=torch.cat([ca.mask, cb.mask], 1),
                           negative_prompt_embeds=torch.cat([ua.embeds, ub.embeds], 1),
                           negative_prompt_attention_mask=torch.cat([ua.mask, ub.mask], 1))
    torch.testing.assert_close(got["concat"], joined, atol=1e-3, rtol=0)  # latents of std ~8
    averaged = _engine_latent(pipe, 2, prompt_embeds=(ca.embeds + cb.embeds) / 2,
                              prompt_attention_mask=ca.mask | cb.mask,
                              negative_prompt_embeds=(ua.embeds + ub.embeds) / 2,
                              negative_prompt_attention_mask=ua.mask | ub.mask)
    torch.testing.assert_close(got["half"], averaged, atol=1e-3, rtol=0)
    assert "was changed by another node" not in (server.root / "comfy.log").read_text()


def _engine_mixture(pipe, conds: list, weight, steps: int) -> torch.Tensor:
    """The engine's latent when each step's prediction is the mean of the CFG predictions of `conds` (the engine's
    (cond, uncond) pairs) weighted per latent pixel by weight(i, sigma) (a number or (1, 1, h, w)): ComfyUI's
    meaning of several conditionings on one side (combined, masked, timestep ranges) with one negative."""
    from unittest import mock

    import sana_core.pipeline as engine

    single = engine.SanaDenoiser

    def mixture(dit, cond, uncond, *args, **kwargs):
        parts = [single(dit, c, u, *args, **kwargs) for c, u in conds]

        def denoise(x, sigma, **extra):
            w = [weight(i, float(torch.as_tensor(sigma).reshape(-1)[0])) for i in range(len(parts))]
            return sum(wi * d(x, sigma, **extra) for wi, d in zip(w, parts)) / sum(w)

        denoise.schedule_controls = lambda sigmas: [d.schedule_controls(sigmas) for d in parts]
        denoise.check_finite = lambda: [d.check_finite() for d in parts]
        return denoise

    with mock.patch.object(engine, "SanaDenoiser", mixture):  # the prompt given is replaced by `conds`
        return _engine_latent(pipe, steps, prompt="unused")


def test_combined_masked_and_timestep_ranged_prompts_equal_the_engine(server):
    """ConditioningCombine of two prompts = the mean of their predictions; ConditioningSetMask on each (left half /
    its InvertMask) = the left half follows prompt A, the rest prompt B; ConditioningSetTimestepRange [0, 0.3] /
    [0.3, 1] = prompt A on the steps from sigma 0.875 up (shift 3), B below: each equals the engine mixing the two
    prompts' predictions that way."""
    p, texts, b = _two_prompts(server, steps=2)
    pos = p[node(p, "SanaSampler")]["inputs"]["positive"]
    combine = lambda name, one, two: add(p, name, "ConditioningCombine", conditioning_1=one, conditioning_2=two)
    w, h = SMALL
    left = add(p, "left", "MaskComposite", destination=add(p, "zeros", "SolidMask", value=0.0, width=w, height=h),
               source=add(p, "ones", "SolidMask", value=1.0, width=w // 2, height=h), x=0, y=0, operation="add")
    masked = [add(p, f"mask_{i}", "ConditioningSetMask", conditioning=c, mask=m, strength=1.0, set_cond_area="default")
              for i, (c, m) in enumerate(((pos, left), (b["pos"], add(p, "right", "InvertMask", mask=left))))]
    ranged = [add(p, f"range_{i}", "ConditioningSetTimestepRange", conditioning=c, start=start, end=end)
              for i, (c, start, end) in enumerate(((pos, 0.0, 0.3), (b["pos"], 0.3, 1.0)))]
    _sampled(p, "combined", positive=combine("both", pos, b["pos"]))
    _sampled(p, "masked", positive=combine("both_masked", *masked))
    _sampled(p, "ranged", positive=combine("both_ranged", *ranged))
    run_images(server, p)
    got = {name: _latest_latent(server, f"e2e_cond_{name}") for name in ("a", "combined", "masked", "ranged")}
    m = torch.zeros(1, 1, h // 32, w // 32)
    m[..., : w // 64] = 1  # the left half at latent size
    split = 0.875  # ModelSamplingDiscreteFlow.percent_to_sigma(0.3) at shift 3: 3 t / (1 + 2 t), t = 1 - 0.3
    pipe = _tiny_engine(server.sana)
    conds = [pipe.encode_prompt([texts[k]["positive"]], [texts["a"]["negative"]]) for k in ("a", "b")]
    weights = {"combined": lambda i, s: 1.0, "masked": lambda i, s: (m, 1 - m)[i],
               "ranged": lambda i, s: float(s >= split) if i == 0 else float(s <= split)}  # 2 steps: A, B
    for name, weight in weights.items():
        torch.testing.assert_close(got[name], _engine_mixture(pipe, conds, weight, steps=2), atol=1e-3, rtol=0,
                                   msg=name)
        assert (got[name] - got["a"]).abs().mean() > 1, name  # prompt B acts


def test_core_empty_latent_gives_the_size_asked(server):
    """EmptyLatentImage (1/8 scale, 4 channels) under KSampler on a Sana model makes the image size asked."""
    p = prepare(server, ROOT / "workflows" / "sana_ksampler.json")
    sampler = node(p, "KSampler")
    p[sampler]["inputs"]["latent_image"] = add(p, "empty", "EmptyLatentImage", width=SMALL[0], height=SMALL[1],
                                              batch_size=1)
    (image,) = run_images(server, p).values()
    assert image.shape[:2] == (SMALL[1], SMALL[0])


def test_core_pixel_size_latent_nodes_give_the_size_asked_on_sana_latents(server):
    """LatentUpscale, LatentCrop, LatentComposite and LatentCompositeMasked (sizes and offsets in pixels, divided by
    8 in core) on Sana latents (1/32): the size and place asked, for latents from our nodes (which carry
    `downscale_ratio_spacial`) and from core's VAEEncode (which does not); a size that is no multiple of 32 is
    rounded down with a console warning naming the node; a 1/8 latent is left to core."""
    vae = ["vae", 0]
    p = {"vae": {"class_type": "SanaDCAELoader", "inputs": {"vae_name": "sana_e2e_tiny/", "dtype": "fp32"}}}
    source = add(p, "source", "VAEEncode", pixels=add(p, "load", "LoadImage", image="example.png"), vae=vae)
    empty = lambda name, w, h: add(p, name, "SanaEmptyLatentImage", width=w, height=h, batch_size=1)
    upscale = lambda name, samples, w, h: add(p, name, "LatentUpscale", samples=samples, upscale_method="bilinear",
                                              width=w, height=h, crop="disabled")
    latents = {  # name -> (output, latent (h, w) expected)
        "source": (source, (SMALL[1] // 32, SMALL[0] // 32)),
        "up": (upscale("up", source, 384, 256), (8, 12)),
        "up_height_only": (upscale("up_h", source, 0, 256), (8, 12)),
        "up_rounded": (upscale("up_r", empty("square", 256, 256), 400, 256), (8, 12)),
        "up_least": (upscale("up_l", ["square", 0], 128, 256), (8, 8)),  # core's least: 8 latent pixels
        "crop": (add(p, "crop", "LatentCrop", samples=empty("big", 512, 512), width=128, height=64, x=64, y=32),
                 (2, 4)),
        "composite": (add(p, "comp", "LatentComposite", samples_to=["square", 0], samples_from=source, x=64, y=32,
                          feather=0), (8, 8)),
        "masked": (add(p, "comp_m", "LatentCompositeMasked", destination=["square", 0], source=source, x=64, y=96,
                       resize_source=False), (8, 8)),
        "eighth": (upscale("up_8", add(p, "e8", "EmptyLatentImage", width=64, height=64, batch_size=1), 128, 128),
                   (16, 16)),
    }
    for name, (link, _) in latents.items():
        add(p, f"latent_{name}", "SaveLatent", samples=link, filename_prefix=f"e2e_sizes_{name}")
    save(p, "decoded", add(p, "decode", "VAEDecode", samples=latents["up"][0], vae=vae))
    got = run_images(server, p)
    assert got["decoded"].shape[:2] == (256, 384)
    z = {name: _latest_latent(server, f"e2e_sizes_{name}") for name in latents}
    for name, (_, size) in latents.items():
        assert tuple(z[name].shape[-2:]) == size, name
    placed = torch.zeros_like(z["composite"])
    placed[..., 1:5, 2:8] = z["source"]  # x 64 px, y 32 px: latent column 2, row 1
    assert torch.equal(z["composite"], placed)
    placed = torch.zeros_like(z["masked"])
    placed[..., 3:7, 2:8] = z["source"]  # y 96 px: row 3
    assert torch.equal(z["masked"], placed)
    console = (server.root / "comfy.log").read_text()
    assert "LatentUpscale: width=400 on a Sana latent (1/32 of the image) becomes 384 px" in console
    assert "LatentUpscale: width=128 on a Sana latent (1/32 of the image) becomes 256 px: core's node makes at " \
           "least 8 latent pixels" in console


def test_a_non_number_is_refused_by_core_naming_the_field(server):
    """Core converts and range-checks the widgets our validation does not name: a text in an INT is core's
    error on that field, not a crash in our validation; our own errors are not repeated under every input."""
    p = prepare(server, T2I)
    latent, sampler = node(p, "SanaEmptyLatentImage"), node(p, "SanaSampler")
    p[latent]["inputs"]["width"] = "abc"
    p[sampler]["inputs"]["cfg"] = float("nan")
    code, answer = server.queue(p)
    assert code == 400
    width_errors = answer["node_errors"][latent]["errors"]
    assert any("width" in e["details"] for e in width_errors)
    assert "not all arguments converted" not in json.dumps(width_errors)
    cfg_errors = answer["node_errors"][sampler]["errors"]
    assert all("cfg: nan is not a finite number" in e["details"] for e in cfg_errors)
    assert len(cfg_errors) < len(p[sampler]["inputs"])
