"""Loader nodes: the Sana DiT as a MODEL, Gemma-2, the DC-AE as a core VAE, a whole diffusers folder, LoRAs."""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from .common import CATEGORY, DTYPES, choices, eager_ops, full_path, pick_dtype
from .gguf import gguf_choices

log = logging.getLogger(__name__)
DIT_FOLDERS = ("diffusion_models", "checkpoints")
#: The DiT loader also lists models/controlnet: NVlabs' ControlNet releases hold the base DiT too.
CKPT_FOLDERS = DIT_FOLDERS + ("controlnet",)
USE_PE = {"auto": None, "on": True, "off": False}
WEIGHT_DTYPE_TIP = ("storage dtype of the weights; default: ComfyUI's choice for this GPU (bf16 where supported). "
                    "fp8 stores in 8 bits and computes in bf16/fp16 (half the memory); _fast uses fp8 matmuls "
                    "where the GPU has them")
USE_PE_TIP = ("the 2K/4K models' sin-cos positional embedding: auto reads it from the folder's config or the file "
              "name (Sana_1600M_4Kpx...); on/off force it (for a renamed 2K/4K file)")


def _weight_dtypes() -> list[str]:
    from .model import WEIGHT_DTYPES

    return list(WEIGHT_DTYPES)


def load_model(path: str, name: str, weight_dtype: str, use_pe: str) -> io.NodeOutput:
    """The MODEL output shared by the DiT and folder loaders (the variant is drawn on the node)."""
    from .model import load_sana_model

    model = load_sana_model(path, weight_dtype, USE_PE[use_pe])
    log.info("Sana: %s is %s", name, model.model.sana_variant)
    return model


def load_gemma(path: str, dtype: str):
    """Gemma-2 as a core CLIP on ComfyUI's text-encoder device, offloaded by its memory manager when idle."""
    import comfy.model_management as mm
    import torch

    from ..sana_core.checkpoints.gemma import load_text_encoder

    from .clip import sana_clip

    device = mm.text_encoder_device()
    te = load_text_encoder(path, dtype=pick_dtype(dtype, device, (torch.bfloat16, torch.float32)),
                           device=mm.text_encoder_offload_device())
    return sana_clip(te, device, mm.text_encoder_offload_device())


def load_vae(path: str, dtype: str):
    """The DC-AE as a core VAE on ComfyUI's VAE device (`--cpu-vae`)."""
    import comfy.model_management as mm
    import comfy.ops

    from ..sana_core.checkpoints.dcae import load_dcae

    from .vae import SanaVAE

    device = mm.vae_device()
    chosen = DTYPES[dtype] or mm.vae_dtype(device, SanaVAE.WORKING_DTYPES)
    dcae = load_dcae(path, dtype=chosen, device=mm.vae_offload_device(), ops=eager_ops(comfy.ops.disable_weight_init))
    vae = SanaVAE(dcae, device=device)
    return vae


class SanaCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaCheckpointLoader", display_name="Load Sana Model", category=CATEGORY,
            description="Loads a Sana DiT (NVlabs .pth, safetensors of either layout, or a diffusers folder) from "
                        "models/diffusion_models or models/checkpoints; a .gguf from models/diffusion_models or "
                        "models/unet stays quantized and is dequantized layer by layer. The variant (0.6B, 1.6B, "
                        "2K/4K, Sana 1.5, "
                        "Sprint) is detected from the weights. Outputs a native MODEL for SanaSampler, KSampler, "
                        "SamplerCustomAdvanced, shift nodes and LoRA loaders. NVlabs' ControlNet releases "
                        "(Sana_*_ControlNet_HED.pth, in models/controlnet) hold the base DiT too: pick the file here "
                        "and in SanaControlNetLoader (its branch is read there, the base here).",
            inputs=[io.Combo.Input("ckpt_name", options=choices(*CKPT_FOLDERS, component="transformer") +
                                   gguf_choices(*DIT_FOLDERS),
                                   tooltip="DiT file or folder (a Sana diffusers folder or its transformer/)"),
                    io.Combo.Input("weight_dtype", options=_weight_dtypes(), default="default",
                                   tooltip=WEIGHT_DTYPE_TIP),
                    io.Combo.Input("use_pe", options=list(USE_PE), default="auto", optional=True,
                                   tooltip=USE_PE_TIP)],
            outputs=[io.Model.Output(tooltip="the Sana DiT as a native MODEL")])

    @classmethod
    def execute(cls, ckpt_name: str, weight_dtype: str, use_pe: str = "auto") -> io.NodeOutput:
        model = load_model(full_path(ckpt_name, *CKPT_FOLDERS), ckpt_name, weight_dtype, use_pe)
        return io.NodeOutput(model, ui={"sana_variant": [model.model.sana_variant]})


class SanaControlNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaControlNetLoader", display_name="Load Sana ControlNet", category=CATEGORY,
            description="Loads a Sana ControlNet from models/controlnet: NVlabs' released HED ControlNets "
                        "(Sana_600M / Sana_1600M_1024px_ControlNet_HED.pth, which also hold the base DiT: only the "
                        "branch is read here), a branch-only file, or a diffusers SanaControlNetModel folder. Use "
                        "it with core Apply ControlNet (strength, start/end percent, chaining) and give that node "
                        "the Sana VAE: the control image (white scribbles on black for HED) is encoded by the DC-AE.",
            inputs=[io.Combo.Input("control_net_name", options=choices("controlnet", component="controlnet"),
                                   tooltip="a Sana ControlNet file or folder in models/controlnet"),
                    io.Combo.Input("weight_dtype", options=_weight_dtypes(), default="default",
                                   tooltip=WEIGHT_DTYPE_TIP),
                    io.Vae.Input("vae", optional=True,
                                 tooltip="Sana's DC-AE, used when Apply ControlNet gets no VAE (e.g. the old Apply "
                                         "ControlNet node, which has no vae input)")],
            outputs=[io.ControlNet.Output(tooltip="a Sana ControlNet for core Apply ControlNet")])

    @classmethod
    def execute(cls, control_net_name: str, weight_dtype: str, vae=None) -> io.NodeOutput:
        from .controlnet import load_sana_controlnet

        return io.NodeOutput(load_sana_controlnet(full_path(control_net_name, "controlnet"), weight_dtype, vae))


class SanaGemmaLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaGemmaLoader", display_name="Load Gemma-2 (Sana)", category=CATEGORY,
            description="Loads Sana's text encoder, Gemma-2-2B-IT, from models/text_encoders: an HF folder, a Sana "
                        "diffusers folder (text_encoder/ + tokenizer/) or ComfyUI's single-file gemma_2_2b with "
                        "its embedded tokenizer, or a llama.cpp Gemma-2 .gguf (in models/text_encoders or "
                        "models/clip). The output is a core CLIP: CLIPTextEncode gives Sana conditioning "
                        "(the complex human instruction for positives, plain negatives, 300 tokens). Runs on "
                        "ComfyUI's text-encoder device, in bf16 or fp32 (fp16 overflows in Gemma), and is offloaded "
                        "while other models run.",
            inputs=[io.Combo.Input("text_encoder", options=choices("text_encoders", component="text_encoder") +
                                   gguf_choices("text_encoders"),
                                   tooltip="Gemma-2-2B-IT folder, Sana diffusers folder or single file"),
                    io.Combo.Input("dtype", options=["default", "bf16", "fp32"], default="default",
                                   tooltip="default: bf16 where the text-encoder device supports it, else fp32")],
            outputs=[io.Clip.Output(tooltip="Gemma-2 as a CLIP: core CLIPTextEncode (and any prompt node taking a "
                                            "CLIP) or SanaGemmaTextEncode turn prompts into Sana conditioning")])

    @classmethod
    def execute(cls, text_encoder: str, dtype: str) -> io.NodeOutput:
        return io.NodeOutput(load_gemma(full_path(text_encoder, "text_encoders"), dtype))


class SanaDCAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaDCAELoader", display_name="Load DC-AE (Sana VAE)", category=CATEGORY,
            description="Loads Sana's 32x autoencoder (DC-AE f32c32 1.0 / 1.1 / lite) from models/vae: mit-han-lab "
                        "efficientvit files, diffusers AutoencoderDC folders or a Sana folder's vae/. The output is a "
                        "core VAE: VAEDecode, VAEDecodeTiled, VAEEncode, VAEEncodeForInpaint, "
                        "InpaintModelConditioning and other nodes taking a VAE use it.",
            inputs=[io.Combo.Input("vae_name", options=choices("vae", component="vae"),
                                   tooltip="DC-AE file or folder"),
                    io.Combo.Input("dtype", options=list(DTYPES), default="default",
                                   tooltip="default: ComfyUI's VAE dtype for its VAE device (bf16 or fp32); a "
                                           "float16 DC-AE that overflows switches to bf16 with a warning")],
            outputs=[io.Vae.Output(tooltip="the DC-AE as a core VAE")])

    @classmethod
    def execute(cls, vae_name: str, dtype: str) -> io.NodeOutput:
        return io.NodeOutput(load_vae(full_path(vae_name, "vae"), dtype))


class SanaFolderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaFolderLoader", display_name="Load Sana (diffusers folder)", category=CATEGORY,
            description="Loads a whole Sana diffusers folder (model_index.json with transformer/, text_encoder/, "
                        "tokenizer/, vae/) from models/diffusion_models or models/checkpoints: the DiT as a MODEL, "
                        "Gemma-2 and the DC-AE as a VAE, like core's checkpoint loader.",
            inputs=[io.Combo.Input("folder", options=[c for c in choices(*DIT_FOLDERS) if _is_pipeline(c)],
                                   tooltip="a Sana diffusers folder (e.g. Sana_1600M_1024px_BF16_diffusers/)"),
                    io.Combo.Input("weight_dtype", options=_weight_dtypes(), default="default",
                                   tooltip=WEIGHT_DTYPE_TIP),
                    io.Combo.Input("text_encoder_dtype", options=["default", "bf16", "fp32"], default="default",
                                   tooltip="Gemma-2: bf16 where the text-encoder device supports it, else fp32"),
                    io.Combo.Input("vae_dtype", options=list(DTYPES), default="default",
                                   tooltip="DC-AE: ComfyUI's VAE dtype for its VAE device by default")],
            outputs=[io.Model.Output(tooltip="the Sana DiT"),
                     io.Clip.Output(tooltip="Gemma-2 as a CLIP, for CLIPTextEncode or SanaGemmaTextEncode"),
                     io.Vae.Output(tooltip="the DC-AE as a core VAE")])

    @classmethod
    def execute(cls, folder: str, weight_dtype: str, text_encoder_dtype: str, vae_dtype: str) -> io.NodeOutput:
        path = full_path(folder, *DIT_FOLDERS)
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(f"{folder}: not a diffusers pipeline folder (no model_index.json); load its parts "
                             "with SanaCheckpointLoader, SanaGemmaLoader and SanaDCAELoader")
        model = load_model(path, folder, weight_dtype, "auto")
        return io.NodeOutput(model, load_gemma(path, text_encoder_dtype), load_vae(path, vae_dtype),
                             ui={"sana_variant": [model.model.sana_variant]})


def _is_pipeline(choice: str) -> bool:
    return choice.endswith("/") and any(
        os.path.isfile(os.path.join(base, choice, "model_index.json"))
        for base in _bases(DIT_FOLDERS))


def _bases(folders: tuple[str, ...]) -> list[str]:
    import folder_paths

    return [p for f in folders for p in folder_paths.get_folder_paths(f)]


class SanaLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaLoraLoader", display_name="Load Sana LoRA", category=CATEGORY,
            description="Applies a Sana LoRA from models/loras to a Sana MODEL: diffusers/PEFT files "
                        "(transformer.transformer_blocks.N.attn1.to_q...), kohya-style lora_unet_/lora_transformer_ "
                        "names, NVlabs names and ComfyUI's own (diffusion_model.blocks.N..., as its LoRA trainer "
                        "writes); q/k/v LoRAs patch their part of our fused weights.",
            inputs=[io.Model.Input("model", tooltip="a Sana MODEL"),
                    io.Combo.Input("lora_name", options=choices("loras"), tooltip="a LoRA file in models/loras"),
                    io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                                   tooltip="multiplier of the LoRA's change; 0 leaves the model as it is")],
            outputs=[io.Model.Output(tooltip="the MODEL with the LoRA applied")])

    @classmethod
    def validate_inputs(cls, strength: float | None = None) -> bool | str:
        from .common import check_widgets

        return check_widgets(cls, {"strength": strength})

    @classmethod
    def execute(cls, model, lora_name: str, strength: float) -> io.NodeOutput:
        import comfy.lora
        import comfy.utils

        from .lora import sana_key_map

        key_map = sana_key_map(model.model)
        if not key_map:
            raise ValueError("SanaLoraLoader: the MODEL is not a Sana model; load it with SanaCheckpointLoader")
        try:
            lora = comfy.utils.load_torch_file(full_path(lora_name, "loras"), safe_load=True)
        except Exception as e:  # a truncated or foreign file: say which, whatever the reader raised
            raise ValueError(f"{lora_name}: cannot be read as a LoRA ({type(e).__name__}: "
                             f"{e or 'empty or truncated file'})") from e
        patches = comfy.lora.load_lora(lora, key_map)
        if not patches:
            raise ValueError(f"{lora_name}: no key matches a Sana DiT layer (found e.g. {list(lora)[:3]}); expected a "
                             "Sana LoRA (diffusers, kohya, NVlabs or ComfyUI names)")
        patched = model.clone()
        patched.add_patches(patches, strength)
        return io.NodeOutput(patched)
