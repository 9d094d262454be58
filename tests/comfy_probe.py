"""Run by test_comfyui_contracts.py with ComfyUI's Python in its folder: `python comfy_probe.py PACK TINY_PIPELINE`.

Builds the pack's objects on the real core (no server) and prints one JSON line of facts the test checks: which
attributes core's own classes set that ours lack, which patcher class was used, what core's CLIPTextEncode makes
of a prompt on our CLIP (sampled as positive and as negative) against the engine's encoder.
"""
import importlib.util
import json
import sys
from pathlib import Path

pack_dir, pipeline = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(Path.cwd()))
sys.argv = [sys.argv[0], "--cpu"]  # parsed as ComfyUI's main.py does, before comfy.model_management is imported
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.controlnet  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402

spec = importlib.util.spec_from_file_location("comfyui_sana_probe", pack_dir / "__init__.py",
                                              submodule_search_locations=[str(pack_dir)])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
loaders = importlib.import_module(f"{spec.name}.nodes.loaders")
common = importlib.import_module(f"{spec.name}.nodes.common")
core = importlib.import_module(f"{spec.name}.sana_core.checkpoints.gemma")

facts = {}
# -- VAE: every attribute a core VAE sets (built here from a tiny AutoencoderKL config) is set on ours
tiny_kl = {"params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2],
    "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}
core_vae = comfy.sd.VAE(sd={}, config=tiny_kl)
ours = loaders.load_vae(str(pipeline / "vae"), "fp32")
facts["vae_missing"] = sorted(k for k in vars(core_vae) if not hasattr(ours, k))
facts["vae_attributes"] = sorted(dir(ours))
facts["vae_patcher"] = type(ours.patcher).__name__
facts["core_patcher"] = common.core_patcher().__name__

# -- the DiT's patcher
model = loaders.load_model(str(pipeline / "transformer"), "tiny", "fp32", "auto")
facts["dit_patcher"] = type(model).__name__
loaded = {f"{entry[1]}.{name}".lstrip(".") for entry in model._load_list() for name in entry[3]}
facts["unpatchable"] = sorted(set(dict(model.model.named_parameters())) - loaded)
facts["dit_parameters"] = len(dict(model.model.named_parameters()))

# -- core CLIPTextEncode on the Sana CLIP = the engine's encoder, on both sides
import nodes  # noqa: E402

clip = loaders.load_gemma(str(pipeline), "fp32")
engine = core.load_text_encoder(str(pipeline), dtype=torch.float32)
text = "a red fox in the snow, photograph"
encoded = nodes.CLIPTextEncode().encode(clip, text)
conditioning = encoded[0] if isinstance(encoded, tuple) else encoded.result[0]
(cond, extra), = conditioning
sana_model = model.model
for side, use_chi in (("positive", True), ("negative", False)):
    want, want_mask = engine.encode([text], use_chi=use_chi)
    got = sana_model.extra_conds(cross_attn=cond, prompt_type=side, device=torch.device("cpu"),
                                 noise=torch.zeros(1, 32, 4, 4), **extra)
    facts[f"{side}_max_diff"] = float((got["c_crossattn"].cond - want).abs().max())
    facts[f"{side}_mask_equal"] = bool(torch.equal(got["attention_mask"].cond.long(), want_mask.long()))
zeroed = nodes.ConditioningZeroOut().zero_out(conditioning)[0]
got = sana_model.extra_conds(cross_attn=zeroed[0][0], prompt_type="negative", device=torch.device("cpu"),
                             noise=torch.zeros(1, 32, 4, 4), **zeroed[0][1])
facts["zeroed_negative_is_zero"] = bool((got["c_crossattn"].cond == 0).all())
facts["clip_class"] = type(clip).__module__ + "." + type(clip).__name__

# -- ConditioningConcat: the second prompt's tokens are attended too
other = nodes.CLIPTextEncode().encode(clip, "a blue bird")[0]
(joined, joined_extra), = nodes.ConditioningConcat().concat(conditioning, other)[0]
got = sana_model.extra_conds(cross_attn=joined, prompt_type="positive", device=torch.device("cpu"),
                             noise=torch.zeros(1, 32, 4, 4), **joined_extra)
want = torch.cat([extra["attention_mask"], other[0][1]["attention_mask"]], dim=-1)
facts["concat_mask_equal"] = bool(torch.equal(got["attention_mask"].cond.long(), want.long()))

# -- a foreign ControlNet is refused before sampling
patches = importlib.import_module(f"{spec.name}.nodes.patches")
try:
    patches.check_controls({"positive": [{"control": comfy.controlnet.ControlNet(torch.nn.Linear(2, 2))}]})
    facts["foreign_controlnet"] = None
except ValueError as e:
    facts["foreign_controlnet"] = str(e)
print(json.dumps(facts))
