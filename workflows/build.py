"""Writes the bundled workflows (ComfyUI UI format) next to this file from the nodes' own schemas:
`python workflows/build.py OBJECT_INFO` (a saved `/object_info` of a ComfyUI with this pack, or its URL).

Each node is given its socket links and widget values by name; sockets, their types and order, outputs and the
widgets' stored order come from the schema, so a renamed or retyped input cannot leave a workflow broken without
the host suite failing (it rebuilds every workflow from the running server and compares). Model names are
those of the real releases (see the README's model table); the end-to-end tests swap in tiny models.
"""
from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # the sampling defaults of sana_core.spec (a standalone module)

from sana_core.spec import SANA, SPRINT  # noqa: E402

APP_PAG_SCALE = 2.0  # NVlabs' Gradio apps' PAG scale (the API's and CLI's PAG is off unless asked)
DIT = "Sana_1600M_1024px_BF16_diffusers/"
GEMMA = "gemma-2-2b-it/"
DCAE = "dc-ae-f32c32-sana-1.1-diffusers/"
NEGATIVE = ""
PROMPT = 'a cyberpunk cat with a neon sign that says "Sana", highly detailed, cinematic lighting'
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def is_widget(spec: list) -> bool:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def ordered_inputs(node_def: dict) -> list[tuple[str, list]]:
    """[(name, spec)] of a node definition in the frontend's order: required, then optional."""
    out = []
    for group in ("required", "optional"):
        specs = node_def["input"].get(group, {})
        out += [(name, specs[name]) for name in node_def.get("input_order", {}).get(group) or list(specs)]
    return out


def widget_layout(node_def: dict) -> list[tuple[str, int, list]]:
    """[(widget name, values it stores, spec)] in `widgets_values` order: a seed-like INT stores its value and
    "control_after_generate", a combo with that option three values, an upload widget one more."""
    out = []
    for name, spec in ordered_inputs(node_def):
        if not is_widget(spec):
            continue
        kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
        n = 1
        if kind == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
            n = 2
        elif (isinstance(kind, list) or kind == "COMBO") and opts.get("control_after_generate"):
            n = 3
        if opts.get("image_upload"):
            n += 1
        out.append((name, n, spec))
    return out


def _default(spec: list) -> object:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if "default" in opts:
        return opts["default"]
    options = kind if isinstance(kind, list) else opts.get("options")
    if options:
        return options[0]
    raise KeyError("no default")


class Graph:
    """A UI-format workflow under construction from node schemas (`/object_info`): nodes placed in columns,
    links by (node id, output slot), widget values by name (unnamed ones take the schema's default)."""

    def __init__(self, info: dict) -> None:
        self.info = info
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, type_: str, widgets: dict, col: int, row: int, title: str | None = None, **sources) -> int:
        if type_ not in self.info:
            raise KeyError(f"node type {type_!r} is not in the schemas")
        node_def, nid = self.info[type_], len(self.nodes) + 1
        values, unknown = [], set(widgets)
        for name, n, spec in widget_layout(node_def):
            unknown.discard(name)
            try:
                values.append(widgets[name] if name in widgets else _default(spec))
            except KeyError:
                raise KeyError(f"{type_}: widget {name!r} needs a value") from None
            values += ["fixed"] * (n - 1 - bool(spec[1].get("image_upload") if len(spec) > 1 else False))
            if len(spec) > 1 and spec[1].get("image_upload"):
                values.append("image")
        sockets = [(name, spec[0]) for name, spec in ordered_inputs(node_def) if not is_widget(spec)]
        unknown |= set(sources) - {name for name, _ in sockets}
        if unknown:
            known = [n for n, _ in ordered_inputs(node_def)]
            raise KeyError(f"{type_} has no input {sorted(unknown)} (inputs: {known})")
        names = node_def.get("output_name") or node_def["output"]
        node = {"id": nid, "type": type_, "pos": [40 + 360 * col, 60 + 260 * row], "size": [320, 200],
                "flags": {}, "order": nid - 1, "mode": 0, "properties": {"Node name for S&R": type_},
                "inputs": [], "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                                          for i, (n, t) in enumerate(zip(names, node_def["output"]))],
                "widgets_values": values}
        if title:
            node["title"] = title
        for slot, (name, typ) in enumerate(sockets):
            link = None
            if name in sources:
                src, src_slot = sources[name] if isinstance(sources[name], tuple) else (sources[name], 0)
                out_type = self.nodes[src - 1]["outputs"][src_slot]["type"]
                if typ not in ("*", out_type) and out_type not in str(typ).split(","):
                    raise TypeError(f"{type_}.{name} takes {typ}, not {out_type}")
                link = len(self.links) + 1
                self.links.append([link, src, src_slot, nid, slot, out_type])
                self.nodes[src - 1]["outputs"][src_slot]["links"].append(link)
            node["inputs"].append({"name": name, "type": typ, "link": link})
        self.nodes.append(node)
        return nid

    def json(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _front(g: Graph, dit: str = DIT, negative: str = NEGATIVE, prompt: str = PROMPT,
           encoder: str = "CLIPTextEncode") -> tuple[int, int, int, int]:
    """Loaders and both prompts, encoded with core CLIPTextEncode (the model uses each prompt as the side it is
    wired to) or SanaGemmaTextEncode (role set by hand): returns (model, positive, negative, dcae) node ids."""
    model = g.add("SanaCheckpointLoader", {"ckpt_name": dit}, 0, 0)
    gemma = g.add("SanaGemmaLoader", {"text_encoder": GEMMA}, 0, 1)
    dcae = g.add("SanaDCAELoader", {"vae_name": DCAE}, 0, 2)
    pos = _encode(g, encoder, prompt, "positive", 1, 0, gemma)
    neg = _encode(g, encoder, negative, "negative", 1, 1, gemma)
    return model, pos, neg, dcae


def _encode(g: Graph, encoder: str, text: str, role: str, col: int, row: int, clip: int | tuple) -> int:
    title = f"{role.capitalize()} prompt"
    if encoder == "CLIPTextEncode":
        return g.add("CLIPTextEncode", {"text": text}, col, row, title, clip=clip)
    return g.add("SanaGemmaTextEncode", {"text": text, "role": role}, col, row, title, gemma=clip)


def _sampler(**widgets: object) -> dict:
    """SanaSampler widgets: NVlabs' defaults (seed 42 here), with changes."""
    return {"seed": 42, **widgets}


def _generate(g: Graph, dit: str = DIT, size: int = 1024, widgets: dict | None = None, title: str | None = None,
              tiling: str = "auto", encoder: str = "CLIPTextEncode") -> int:
    """Loaders, prompts, an empty latent, SanaSampler and the DC-AE decode; returns the decode node's id."""
    model, pos, neg, dcae = _front(g, dit, encoder=encoder)
    latent = g.add("SanaEmptyLatentImage", {"width": size, "height": size}, 1, 2)
    out = g.add("SanaSampler", widgets or _sampler(), 2, 0, title, model=model, positive=pos, negative=neg,
                latent_image=latent)
    return g.add("SanaDCAEDecode", {"tiling": tiling, "tile_size": 0}, 3, 0, samples=out, dcae=dcae)


def text_to_image(info: dict) -> Graph:
    g = Graph(info)
    g.add("SaveImage", {"filename_prefix": "Sana"}, 4, 0, images=_generate(g))
    return g


def text_to_image_4k(info: dict) -> Graph:
    g = Graph(info)
    image = _generate(g, dit="Sana_1600M_4Kpx_BF16_diffusers/", size=4096, tiling="on")  # the loader sets shift 6
    g.add("SaveImage", {"filename_prefix": "Sana_4K"}, 4, 0, images=image)
    return g


def sprint(info: dict) -> Graph:
    g = Graph(info)
    image = _generate(g, dit="Sana_Sprint_1.6B_1024px_diffusers/",
                      widgets=_sampler(steps=SPRINT.steps, sampler=SPRINT.sampler),
                      title=f"Sana Sampler (Sprint, {SPRINT.steps} steps)", encoder="SanaGemmaTextEncode")
    g.add("SaveImage", {"filename_prefix": "Sana_Sprint"}, 4, 0, images=image)
    return g


def image_to_image(info: dict) -> Graph:
    g = Graph(info)
    model, pos, neg, dcae = _front(g, encoder="SanaGemmaTextEncode")
    image = g.add("LoadImage", {"image": "example.png"}, 1, 2)
    scaled = g.add("ImageScale", {"upscale_method": "lanczos", "width": 1024, "height": 1024, "crop": "center"}, 2, 2,
                   image=(image, 0))
    latent = g.add("SanaDCAEEncode", {}, 3, 2, pixels=scaled, dcae=dcae)
    out = g.add("SanaSampler", _sampler(denoise=0.6), 2, 0, model=model, positive=pos, negative=neg,
                latent_image=latent)
    decoded = g.add("SanaDCAEDecode", {"tile_size": 0}, 3, 0, samples=out, dcae=dcae)
    g.add("SaveImage", {"filename_prefix": "Sana_img2img"}, 4, 0, images=decoded)
    return g


def upscale(info: dict) -> Graph:
    g = Graph(info)
    image = _generate(g, encoder="SanaGemmaTextEncode")
    upscaler = g.add("UpscaleModelLoader", {"model_name": "RealESRGAN_x4plus.pth"}, 3, 1)
    big = g.add("ImageUpscaleWithModel", {}, 4, 0, upscale_model=upscaler, image=image)
    g.add("PreviewImage", {}, 4, 1, "Before upscaling", images=image)
    g.add("SaveImage", {"filename_prefix": "Sana_upscaled"}, 5, 0, images=big)
    return g


def ksampler(info: dict) -> Graph:
    """Core nodes around a Sana MODEL: CLIPTextEncode, SanaPAG -> KSampler, and core VAEDecode on the DC-AE."""
    g = Graph(info)
    model, pos, neg, dcae = _front(g)
    pag = g.add("SanaPAG", {"scale": APP_PAG_SCALE}, 1, 3, model=model)
    latent = g.add("SanaEmptyLatentImage", {"width": 1024, "height": 1024}, 1, 2)
    out = g.add("KSampler", {"seed": 42, "steps": SANA.steps, "cfg": SANA.guidance_scale, "sampler_name": "euler",
                             "scheduler": "simple"},
                2, 0, "KSampler (core)", model=pag, positive=pos, negative=neg, latent_image=latent)
    image = g.add("VAEDecode", {}, 3, 0, samples=out, vae=dcae)
    g.add("SaveImage", {"filename_prefix": "Sana_KSampler"}, 4, 0, images=image)
    return g


def inpaint(info: dict) -> Graph:
    """Inpainting: the whole diffusers folder in one loader, core VAEEncodeForInpaint on the DC-AE, SanaSampler
    honouring the noise mask. The mask here is a square in the middle made with core mask nodes, so the workflow
    repaints something as shipped; use LoadImage's MASK output instead to paint your own in the mask editor."""
    g = Graph(info)
    model = g.add("SanaFolderLoader", {"folder": DIT}, 0, 0)
    pos = _encode(g, "CLIPTextEncode", "a red fox sitting in the grass", "positive", 1, 0, (model, 1))
    neg = _encode(g, "CLIPTextEncode", NEGATIVE, "negative", 1, 1, (model, 1))
    image = g.add("LoadImage", {"image": "example.png"}, 0, 2)
    scaled = g.add("ImageScale", {"upscale_method": "lanczos", "width": 1024, "height": 1024, "crop": "center"}, 0, 3,
                   image=(image, 0))
    canvas = g.add("SolidMask", {"value": 0.0, "width": 1024, "height": 1024}, 0, 4, "Mask: nothing")
    hole = g.add("SolidMask", {"value": 1.0, "width": 512, "height": 512}, 0, 5, "Mask: the square to repaint")
    mask = g.add("MaskComposite", {"x": 256, "y": 256, "operation": "add"}, 1, 4, destination=canvas, source=hole)
    latent = g.add("VAEEncodeForInpaint", {"grow_mask_by": 32}, 1, 2, pixels=scaled, vae=(model, 2), mask=mask)
    out = g.add("SanaSampler", _sampler(), 2, 0, model=model, positive=pos, negative=neg, latent_image=latent)
    decoded = g.add("VAEDecode", {}, 3, 0, samples=out, vae=(model, 2))
    g.add("SaveImage", {"filename_prefix": "Sana_inpaint"}, 4, 0, images=decoded)
    return g


def custom_sampler(info: dict) -> Graph:
    g = Graph(info)
    model, pos, neg, dcae = _front(g)
    latent = g.add("SanaEmptyLatentImage", {"width": 1024, "height": 1024}, 1, 2)
    noise = g.add("RandomNoise", {"noise_seed": 42}, 1, 3)
    guider = g.add("CFGGuider", {"cfg": SANA.guidance_scale}, 2, 1, model=model, positive=pos, negative=neg)
    sampler = g.add("SanaSamplerSelect", {}, 2, 2)
    sigmas = g.add("SanaScheduler", {"steps": SANA.steps}, 2, 3, model=model)
    out = g.add("SamplerCustomAdvanced", {}, 3, 0, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                latent_image=latent)
    image = g.add("SanaDCAEDecode", {"tile_size": 0}, 4, 0, samples=(out, 0), dcae=dcae)
    g.add("SaveImage", {"filename_prefix": "Sana_custom_sampler"}, 5, 0, images=image)
    return g


def controlnet_scribble(info: dict) -> Graph:
    """NVlabs' HED ControlNet: the released .pth is the DiT (SanaCheckpointLoader) and the ControlNet
    (SanaControlNetLoader); core Canny makes a line hint from a photo (comfyui_controlnet_aux's Fake Scribble /
    HED preprocessors match NVlabs' training data better), core Apply ControlNet encodes it with the DC-AE. The
    sampler settings are NVlabs' ControlNet app defaults (Sana's CFG, steps and shift, PAG `APP_PAG_SCALE`)."""
    g = Graph(info)
    release = "Sana_600M_1024px_ControlNet_HED.pth"
    model, pos, neg, dcae = _front(g, dit=release, prompt="a fairytale castle on a hill at sunset, watercolor",
                                   encoder="SanaGemmaTextEncode")
    net = g.add("SanaControlNetLoader", {"control_net_name": release}, 1, 3)
    photo = g.add("LoadImage", {"image": "example.png"}, 0, 3)
    scaled = g.add("ImageScale", {"upscale_method": "lanczos", "width": 1024, "height": 1024, "crop": "center"}, 0, 4,
                   image=(photo, 0))
    hint = g.add("Canny", {"low_threshold": 0.4, "high_threshold": 0.8}, 1, 4,
                 "Line hint (or Fake Scribble / HED from comfyui_controlnet_aux)", image=scaled)
    g.add("PreviewImage", {}, 2, 4, "Hint", images=hint)
    applied = g.add("ControlNetApplyAdvanced", {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}, 2, 2,
                    positive=pos, negative=neg, control_net=net, image=hint, vae=dcae)
    latent = g.add("SanaEmptyLatentImage", {"width": 1024, "height": 1024}, 1, 2)
    out = g.add("SanaSampler", _sampler(pag_scale=APP_PAG_SCALE, shift=SANA.shift), 3, 0, model=model,
                positive=(applied, 0), negative=(applied, 1), latent_image=latent)
    image = g.add("VAEDecode", {}, 4, 0, samples=out, vae=dcae)
    g.add("SaveImage", {"filename_prefix": "Sana_ControlNet"}, 5, 0, images=image)
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


def write(info: dict) -> list[Path]:
    """Build every workflow from the schemas in `info` and write it here."""
    paths = []
    for name, build in WORKFLOWS.items():
        paths.append(HERE / f"{name}.json")
        paths[-1].write_text(json.dumps(build(info).json(), indent=1) + "\n")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python workflows/build.py OBJECT_INFO (a saved /object_info JSON, or http://host:port)")
    source = sys.argv[1]
    if source.startswith("http"):
        with urllib.request.urlopen(source.rstrip("/") + "/object_info") as response:
            schemas = json.load(response)
    else:
        schemas = json.loads(Path(source).read_text())
    for path in write(schemas):
        print(path)
