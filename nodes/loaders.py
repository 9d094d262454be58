"""Loader nodes: the Sana DiT as a MODEL, Gemma-2, and the DC-AE."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from .common import CATEGORY, DCAE, DTYPES, GEMMA, choices, full_path, on_device, patcher, pick_dtype

log = logging.getLogger(__name__)
DIT_FOLDERS = ("diffusion_models", "checkpoints")


class SanaCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaCheckpointLoader", display_name="Load Sana Model", category=CATEGORY,
            description="Loads a Sana DiT (NVlabs .pth, safetensors of either layout, or a diffusers folder) from "
                        "models/diffusion_models or models/checkpoints. The variant (0.6B, 1.6B, 2K/4K, Sana 1.5, "
                        "Sprint) is detected from the weights. Outputs a native MODEL for SanaSampler, KSampler, "
                        "SamplerCustomAdvanced, shift nodes and LoRA loaders.",
            inputs=[io.Combo.Input("ckpt_name", options=choices(*DIT_FOLDERS), tooltip="DiT file or folder"),
                    io.Combo.Input("weight_dtype", options=list(DTYPES), default="default",
                                   tooltip="default: ComfyUI's choice for this GPU (bf16 where supported)")],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, ckpt_name: str, weight_dtype: str) -> io.NodeOutput:
        from .model import load_sana_model

        model = load_sana_model(full_path(ckpt_name, *DIT_FOLDERS), DTYPES[weight_dtype])
        variant = model.model.sana_variant
        log.info("Sana: %s is %s", ckpt_name, variant)
        return io.NodeOutput(model, ui={"sana_variant": [variant]})


class SanaGemmaLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaGemmaLoader", display_name="Load Gemma-2 (Sana)", category=CATEGORY,
            description="Loads Sana's text encoder, Gemma-2-2B-IT, from models/text_encoders: an HF folder, a Sana "
                        "diffusers folder (text_encoder/ + tokenizer/) or ComfyUI's single-file gemma_2_2b with "
                        "its embedded tokenizer. Runs in bf16 or fp32 (fp16 overflows in Gemma).",
            inputs=[io.Combo.Input("text_encoder", options=choices("text_encoders")),
                    io.Combo.Input("dtype", options=["default", "bf16", "fp32"], default="default")],
            outputs=[GEMMA.Output(display_name="gemma")])

    @classmethod
    def execute(cls, text_encoder: str, dtype: str) -> io.NodeOutput:
        import comfy.model_management as mm

        from sana_core.checkpoints.gemma import load_text_encoder

        te = load_text_encoder(full_path(text_encoder, "text_encoders"), dtype=pick_dtype(dtype),
                               device=mm.text_encoder_offload_device())
        return io.NodeOutput(patcher(te))


class SanaDCAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaDCAELoader", display_name="Load DC-AE (Sana VAE)", category=CATEGORY,
            description="Loads Sana's 32x autoencoder (DC-AE f32c32 1.0 / 1.1 / lite) from models/vae: mit-han-lab "
                        "efficientvit files, diffusers AutoencoderDC folders or a Sana folder's vae/. Also fits "
                        "the latent-to-RGB map for live sampling previews (start ComfyUI with --preview-method auto).",
            inputs=[io.Combo.Input("vae_name", options=choices("vae")),
                    io.Combo.Input("dtype", options=list(DTYPES), default="default",
                                   tooltip="default: bf16 on GPUs that support it, else fp32")],
            outputs=[DCAE.Output(display_name="dcae")])

    @classmethod
    def execute(cls, vae_name: str, dtype: str) -> io.NodeOutput:
        import comfy.model_management as mm

        from sana_core.checkpoints.dcae import load_dcae
        from sana_core.previews import fit_latent_rgb

        from .model import SanaLatentFormat

        vae = load_dcae(full_path(vae_name, "vae"), dtype=pick_dtype(dtype), device=mm.vae_offload_device())
        model = patcher(vae)
        if vae.encoder is not None:  # live previews: fit the latent -> RGB map of this DC-AE (all Sana models share it)
            on_device(model)
            factors, bias = fit_latent_rgb(lambda x: vae.scale(vae.encode(x, tiled=False)),
                                           device=mm.get_torch_device(), dtype=next(vae.parameters()).dtype)
            SanaLatentFormat.latent_rgb_factors, SanaLatentFormat.latent_rgb_factors_bias = factors, bias
        return io.NodeOutput(model)


class SanaLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaLoraLoader", display_name="Load Sana LoRA", category=CATEGORY,
            description="Applies a Sana LoRA from models/loras to a Sana MODEL: diffusers/PEFT files "
                        "(transformer.transformer_blocks.N.attn1.to_q...), kohya-style lora_unet_/lora_transformer_ "
                        "names and NVlabs names; q/k/v LoRAs patch their part of our fused weights. (Core's "
                        "LoraLoaderModelOnly also works for LoRAs keyed by our module names.)",
            inputs=[io.Model.Input("model"), io.Combo.Input("lora_name", options=choices("loras")),
                    io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01)],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, lora_name: str, strength: float) -> io.NodeOutput:
        import comfy.lora
        import comfy.utils

        from sana_core.checkpoints.dit import lora_key_map

        dit = getattr(model.model, "diffusion_model", None)
        if not hasattr(dit, "cfg") or not hasattr(dit.cfg, "guidance_embed"):
            raise ValueError("SanaLoraLoader: the MODEL is not a Sana model; load it with SanaCheckpointLoader")
        lora = comfy.utils.load_torch_file(full_path(lora_name, "loras"), safe_load=True)
        patches = comfy.lora.load_lora(lora, lora_key_map(dit.cfg))
        if not patches:
            raise ValueError(f"{lora_name}: no key matches a Sana DiT layer (found e.g. {list(lora)[:3]}); expected a "
                             "Sana LoRA (diffusers, kohya or NVlabs names)")
        patched = model.clone()
        patched.add_patches(patches, strength)
        return io.NodeOutput(patched)
