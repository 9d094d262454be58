"""Writes the bundled workflows (ComfyUI UI format) next to this file: `python workflows/build.py`.

The JSON files are generated so that every workflow wires the nodes the same way; edit them here.
Model names are those of the real releases (see the README's model table); the end-to-end tests swap in
tiny models.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
DIT = "Sana_1600M_1024px_BF16_diffusers/"
GEMMA = "gemma-2-2b-it/"
DCAE = "dc-ae-f32c32-sana-1.1-diffusers/"
NEGATIVE = ""
PROMPT = 'a cyberpunk cat with a neon sign that says "Sana", highly detailed, cinematic lighting'

# node type -> (socket inputs [(name, type)], outputs [(name, type)])
IO = {
    "SanaCheckpointLoader": ([], [("MODEL", "MODEL")]),
    "SanaGemmaLoader": ([], [("gemma", "SANA_GEMMA")]),
    "SanaDCAELoader": ([], [("VAE", "VAE")]),
    "SanaFolderLoader": ([], [("MODEL", "MODEL"), ("gemma", "SANA_GEMMA"), ("VAE", "VAE")]),
    "SanaGemmaTextEncode": ([("gemma", "SANA_GEMMA")], [("CONDITIONING", "CONDITIONING")]),
    "SanaEmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "SanaSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                     ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "SanaDCAEDecode": ([("samples", "LATENT"), ("dcae", "VAE")], [("IMAGE", "IMAGE")]),
    "SanaDCAEEncode": ([("pixels", "IMAGE"), ("dcae", "VAE")], [("LATENT", "LATENT")]),
    "SanaSamplerSelect": ([], [("SAMPLER", "SAMPLER")]),
    "SanaScheduler": ([("model", "MODEL")], [("SIGMAS", "SIGMAS")]),
    "SanaPAG": ([("model", "MODEL")], [("MODEL", "MODEL")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "VAEEncodeForInpaint": ([("pixels", "IMAGE"), ("vae", "VAE"), ("mask", "MASK")], [("LATENT", "LATENT")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "PreviewImage": ([("images", "IMAGE")], []),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "ImageScale": ([("image", "IMAGE")], [("IMAGE", "IMAGE")]),
    "UpscaleModelLoader": ([], [("UPSCALE_MODEL", "UPSCALE_MODEL")]),
    "ImageUpscaleWithModel": ([("upscale_model", "UPSCALE_MODEL"), ("image", "IMAGE")], [("IMAGE", "IMAGE")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "RandomNoise": ([], [("NOISE", "NOISE")]),
    "CFGGuider": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
                  [("GUIDER", "GUIDER")]),
    "SanaControlNetLoader": ([("vae", "VAE")], [("CONTROL_NET", "CONTROL_NET")]),
    "ControlNetApplyAdvanced": ([("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                 ("control_net", "CONTROL_NET"), ("image", "IMAGE"), ("vae", "VAE")],
                                [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
    "Canny": ([("image", "IMAGE")], [("IMAGE", "IMAGE")]),
    "SamplerCustomAdvanced": ([("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"),
                               ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
                              [("output", "LATENT"), ("denoised_output", "LATENT")]),
}


class Graph:
    """A UI-format workflow under construction: nodes placed in columns, links by (node id, output slot)."""

    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, type_: str, widgets: list, col: int, row: int, title: str | None = None, **sources) -> int:
        ins, outs = IO[type_]
        nid = len(self.nodes) + 1
        node = {"id": nid, "type": type_, "pos": [40 + 360 * col, 60 + 260 * row], "size": [320, 200],
                "flags": {}, "order": nid - 1, "mode": 0, "properties": {"Node name for S&R": type_},
                "inputs": [], "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                                          for i, (n, t) in enumerate(outs)],
                "widgets_values": widgets}
        if title:
            node["title"] = title
        for slot, (name, typ) in enumerate(ins):
            link = None
            if name in sources:
                src, src_slot = sources[name] if isinstance(sources[name], tuple) else (sources[name], 0)
                link = len(self.links) + 1
                self.links.append([link, src, src_slot, nid, slot, typ])
                self.nodes[src - 1]["outputs"][src_slot]["links"].append(link)
            node["inputs"].append({"name": name, "type": typ, "link": link})
        self.nodes.append(node)
        return nid

    def json(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _front(g: Graph, dit: str = DIT, negative: str = NEGATIVE, prompt: str = PROMPT) -> tuple[int, int, int, int]:
    """Loaders and both prompts: returns (model, positive, negative, dcae) node ids."""
    model = g.add("SanaCheckpointLoader", [dit, "default", "auto"], 0, 0)
    gemma = g.add("SanaGemmaLoader", [GEMMA, "default"], 0, 1)
    dcae = g.add("SanaDCAELoader", [DCAE, "default"], 0, 2)
    pos = g.add("SanaGemmaTextEncode", [prompt, "positive", True], 1, 0, "Positive prompt", gemma=gemma)
    neg = g.add("SanaGemmaTextEncode", [negative, "negative", True], 1, 1, "Negative prompt", gemma=gemma)
    return model, pos, neg, dcae


def _sampler(steps: int = 20, cfg: float = 4.5, pag: float = 0.0, shift: float = 0.0, sampler: str = "flow_dpmpp_2m",
             denoise: float = 1.0) -> list:
    return [42, "fixed", steps, cfg, pag, "8", shift, sampler, denoise]


def _generate(g: Graph, dit: str = DIT, size: int = 1024, sampler: str = "SanaSampler", widgets: list | None = None,
              title: str | None = None, tiling: str = "auto") -> int:
    """Loaders, prompts, an empty latent, a sampler and the DC-AE decode; returns the decode node's id."""
    model, pos, neg, dcae = _front(g, dit)
    latent = g.add("SanaEmptyLatentImage", [size, size, 1, "custom"], 1, 2)
    out = g.add(sampler, widgets or _sampler(), 2, 0, title, model=model, positive=pos, negative=neg,
                latent_image=latent)
    return g.add("SanaDCAEDecode", [tiling, 0, 256], 3, 0, samples=out, dcae=dcae)


def text_to_image() -> Graph:
    g = Graph()
    g.add("SaveImage", ["Sana"], 4, 0, images=_generate(g))
    return g


def text_to_image_4k() -> Graph:
    g = Graph()
    image = _generate(g, dit="Sana_1600M_4Kpx_BF16_diffusers/", size=4096, tiling="on")  # the loader sets shift 6
    g.add("SaveImage", ["Sana_4K"], 4, 0, images=image)
    return g


def sprint() -> Graph:
    g = Graph()
    image = _generate(g, dit="Sana_Sprint_1.6B_1024px_diffusers/", widgets=_sampler(steps=2, sampler="scm"),
                      title="Sana Sampler (Sprint, 2 steps)")
    g.add("SaveImage", ["Sana_Sprint"], 4, 0, images=image)
    return g


def image_to_image() -> Graph:
    g = Graph()
    model, pos, neg, dcae = _front(g)
    image = g.add("LoadImage", ["example.png", "image"], 1, 2)
    scaled = g.add("ImageScale", ["lanczos", 1024, 1024, "center"], 2, 2, image=(image, 0))
    latent = g.add("SanaDCAEEncode", ["auto"], 3, 2, pixels=scaled, dcae=dcae)
    out = g.add("SanaSampler", _sampler(denoise=0.6), 2, 0, model=model, positive=pos, negative=neg,
                latent_image=latent)
    decoded = g.add("SanaDCAEDecode", ["auto", 0, 256], 3, 0, samples=out, dcae=dcae)
    g.add("SaveImage", ["Sana_img2img"], 4, 0, images=decoded)
    return g


def upscale() -> Graph:
    g = Graph()
    image = _generate(g)
    upscaler = g.add("UpscaleModelLoader", ["RealESRGAN_x4plus.pth"], 3, 1)
    big = g.add("ImageUpscaleWithModel", [], 4, 0, upscale_model=upscaler, image=image)
    g.add("PreviewImage", [], 4, 1, "Before upscaling", images=image)
    g.add("SaveImage", ["Sana_upscaled"], 5, 0, images=big)
    return g


def ksampler() -> Graph:
    """Core nodes around a Sana MODEL: SanaPAG -> KSampler, and core VAEDecode on the DC-AE."""
    g = Graph()
    model, pos, neg, dcae = _front(g)
    pag = g.add("SanaPAG", [2.0, "8"], 1, 3, model=model)
    latent = g.add("SanaEmptyLatentImage", [1024, 1024, 1, "custom"], 1, 2)
    out = g.add("KSampler", [42, "fixed", 20, 4.5, "euler", "simple", 1.0], 2, 0, "KSampler (core)", model=pag,
                positive=pos, negative=neg, latent_image=latent)
    image = g.add("VAEDecode", [], 3, 0, samples=out, vae=dcae)
    g.add("SaveImage", ["Sana_KSampler"], 4, 0, images=image)
    return g


def inpaint() -> Graph:
    """Inpainting: the whole diffusers folder in one loader, LoadImage's mask (paint it in the mask editor),
    core VAEEncodeForInpaint on the DC-AE, SanaSampler honouring the noise mask."""
    g = Graph()
    model = g.add("SanaFolderLoader", [DIT, "default", "default", "default"], 0, 0)
    pos = g.add("SanaGemmaTextEncode", ["a red fox sitting in the grass", "positive", True], 1, 0,
                "Positive prompt", gemma=(model, 1))
    neg = g.add("SanaGemmaTextEncode", [NEGATIVE, "negative", True], 1, 1, "Negative prompt", gemma=(model, 1))
    image = g.add("LoadImage", ["example.png", "image"], 0, 2)
    latent = g.add("VAEEncodeForInpaint", [32], 1, 2, pixels=(image, 0), vae=(model, 2), mask=(image, 1))
    out = g.add("SanaSampler", _sampler(), 2, 0, model=model, positive=pos, negative=neg, latent_image=latent)
    decoded = g.add("VAEDecode", [], 3, 0, samples=out, vae=(model, 2))
    g.add("SaveImage", ["Sana_inpaint"], 4, 0, images=decoded)
    return g


def custom_sampler() -> Graph:
    g = Graph()
    model, pos, neg, dcae = _front(g)
    latent = g.add("SanaEmptyLatentImage", [1024, 1024, 1, "custom"], 1, 2)
    noise = g.add("RandomNoise", [42, "fixed"], 1, 3)
    guider = g.add("CFGGuider", [4.5], 2, 1, model=model, positive=pos, negative=neg)
    sampler = g.add("SanaSamplerSelect", ["flow_dpmpp_2m"], 2, 2)
    sigmas = g.add("SanaScheduler", ["flow_dpmpp_2m", 20, 0.0, 1.0], 2, 3, model=model)
    out = g.add("SamplerCustomAdvanced", [], 3, 0, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                latent_image=latent)
    image = g.add("SanaDCAEDecode", ["auto", 0, 256], 4, 0, samples=(out, 0), dcae=dcae)
    g.add("SaveImage", ["Sana_custom_sampler"], 5, 0, images=image)
    return g


def controlnet_scribble() -> Graph:
    """NVlabs' HED ControlNet: the released .pth is the DiT (SanaCheckpointLoader) and the ControlNet
    (SanaControlNetLoader); core Canny makes a line hint from a photo (comfyui_controlnet_aux's Fake Scribble /
    HED preprocessors match NVlabs' training data better), core Apply ControlNet encodes it with the DC-AE. The
    sampler settings are NVlabs' ControlNet app defaults (CFG 4.5, PAG 2.0, 20 steps, shift 3)."""
    g = Graph()
    release = "Sana_600M_1024px_ControlNet_HED.pth"
    model, pos, neg, dcae = _front(g, dit=release, prompt="a fairytale castle on a hill at sunset, watercolor")
    net = g.add("SanaControlNetLoader", [release, "default"], 1, 3)
    photo = g.add("LoadImage", ["example.png", "image"], 0, 3)
    scaled = g.add("ImageScale", ["lanczos", 1024, 1024, "center"], 0, 4, image=(photo, 0))
    hint = g.add("Canny", [0.4, 0.8], 1, 4, "Line hint (or Fake Scribble / HED from comfyui_controlnet_aux)",
                 image=scaled)
    g.add("PreviewImage", [], 2, 4, "Hint", images=hint)
    applied = g.add("ControlNetApplyAdvanced", [1.0, 0.0, 1.0], 2, 2, positive=pos, negative=neg, control_net=net,
                    image=hint, vae=dcae)
    latent = g.add("SanaEmptyLatentImage", [1024, 1024, 1, "custom"], 1, 2)
    out = g.add("SanaSampler", _sampler(pag=2.0, shift=3.0), 3, 0, model=model, positive=(applied, 0),
                negative=(applied, 1), latent_image=latent)
    image = g.add("VAEDecode", [], 4, 0, samples=out, vae=dcae)
    g.add("SaveImage", ["Sana_ControlNet"], 5, 0, images=image)
    return g


WORKFLOWS = {
    "sana_text_to_image_1024": text_to_image,
    "sana_4k_tiled_decode": text_to_image_4k,
    "sana_sprint_2_steps": sprint,
    "sana_image_to_image": image_to_image,
    "sana_upscale_and_save": upscale,
    "sana_ksampler": ksampler,
    "sana_sampler_custom_advanced": custom_sampler,
    "sana_inpaint": inpaint,
    "sana_controlnet_scribble": controlnet_scribble,
}

if __name__ == "__main__":
    for name, build in WORKFLOWS.items():
        (HERE / f"{name}.json").write_text(json.dumps(build().json(), indent=1) + "\n")
        print(HERE / f"{name}.json")
