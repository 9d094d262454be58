"""GGUF files in the real ComfyUI: a Q8_0 DiT in models/unet and a Q8_0 llama.cpp Gemma in models/clip are listed
by the Sana loaders, generate, and take a LoRA through SanaLoraLoader (patched at dequantization)."""
from __future__ import annotations

import numpy as np
from comfy_server import T2I, node, prepare, run_images

from sana_core.quantize import main as quantize

LORA = "sana_e2e_lora_comfy_keys.safetensors"


def _with_lora(prompt: dict) -> dict:
    sampler = node(prompt, "SanaSampler")
    prompt["lora"] = {"class_type": "SanaLoraLoader", "inputs": {
        "model": prompt[sampler]["inputs"]["model"], "lora_name": LORA, "strength": 1.0}}
    prompt[sampler]["inputs"]["model"] = ["lora", 0]
    return prompt


def test_gguf_dit_and_gemma_generate_and_take_a_lora(server):
    models = server.root / "models"
    assert quantize([str(server.sana), str(models / "unet" / "sana_e2e_q8.gguf"), "--type", "Q8_0"]) == 0
    assert quantize([str(server.sana), str(models / "clip" / "sana_e2e_gemma_q8.gguf"), "--type", "Q8_0",
                     "--model", "gemma"]) == 0
    info = server.request("GET", "/object_info/SanaCheckpointLoader")[1]["SanaCheckpointLoader"]
    assert "sana_e2e_q8.gguf" in info["input"]["required"]["ckpt_name"][1]["options"] or \
        "sana_e2e_q8.gguf" in info["input"]["required"]["ckpt_name"][0]
    images = {}
    for name, lora in (("plain", False), ("gguf", False), ("plain_lora", True), ("gguf_lora", True)):
        prompt = prepare(server, T2I)
        if name.startswith("gguf"):
            prompt[node(prompt, "SanaCheckpointLoader")]["inputs"]["ckpt_name"] = "sana_e2e_q8.gguf"
            prompt[node(prompt, "SanaGemmaLoader")]["inputs"]["text_encoder"] = "sana_e2e_gemma_q8.gguf"
        images[name] = next(iter(run_images(server, _with_lora(prompt) if lora else prompt).values()))
    distance = {k: float(np.abs(images[k] - images[k.replace("gguf", "plain")]).mean()) for k in ("gguf", "gguf_lora")}
    print(f"\nComfyUI, mean |Q8_0 GGUF image - unquantized image| (1/255 units): {distance}")
    assert images["gguf"].std() > 1 and distance["gguf"] < 8 and distance["gguf_lora"] < 8
    assert np.abs(images["gguf_lora"] - images["gguf"]).mean() > 4 * distance["gguf_lora"]  # the LoRA acts
