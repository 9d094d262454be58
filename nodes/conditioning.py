"""Prompt -> CONDITIONING with Gemma-2 and an explicit role (core CLIPTextEncode works too: see clip.py)."""
from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY

ROLES = ("positive", "negative")


class SanaGemmaTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SanaGemmaTextEncode", display_name="Sana Text Encode (Gemma-2)", category=CATEGORY,
            description="Encodes a prompt into Sana's 300 caption tokens with their attention mask. A positive "
                        "prompt gets Sana's complex human instruction (as NVlabs and diffusers do); a negative "
                        "prompt is encoded plain. A longer prompt is cut, with a warning in the console. Core "
                        "CLIPTextEncode on the same CLIP gives the same conditioning, choosing by where it is wired.",
            inputs=[io.Clip.Input("gemma", tooltip="Gemma-2 (a CLIP) from SanaGemmaLoader or SanaFolderLoader"),
                    io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="the prompt"),
                    io.Combo.Input("role", options=list(ROLES), default="positive",
                                   tooltip="positive: with the complex human instruction; negative: without"),
                    io.Boolean.Input("complex_human_instruction", default=True, optional=True,
                                     tooltip="turn the instruction off for positive prompts too")],
            outputs=[io.Conditioning.Output(tooltip="Sana caption embeddings and mask for a sampler")])

    @classmethod
    def execute(cls, gemma, text: str, role: str, complex_human_instruction: bool = True) -> io.NodeOutput:
        import comfy.model_management as mm

        from .clip import text_encoder

        encoder = text_encoder(gemma, "SanaGemmaTextEncode")
        embeds, mask = encoder.encode([text], use_chi=role == "positive" and complex_human_instruction)
        out = mm.intermediate_device()
        return io.NodeOutput([[embeds.to(out), {"attention_mask": mask.to(out)}]])
