"""Prompt -> CONDITIONING with Gemma-2 and an explicit role (core CLIPTextEncode works too: see clip.py), and core's
conditioning nodes that combine two prompts' tensors (ConditioningAverage, ConditioningConcat) made to combine
Sana's attention masks and negative sides too (`install`)."""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from comfy_api.latest import io

from .common import CATEGORY, wrap_once

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

        from .clip import SANA_CHI, SANA_PLAIN, text_encoder

        encoder = text_encoder(gemma, "SanaGemmaTextEncode")
        embeds, mask = encoder.encode([text], use_chi=role == "positive" and complex_human_instruction)
        out = mm.intermediate_device()
        embeds, mask = embeds.to(out), mask.to(out)  # the same encoding on both sides: the role is set here
        return io.NodeOutput([[embeds, {"attention_mask": mask, SANA_PLAIN: (embeds, mask), SANA_CHI: embeds}]])


def install() -> None:
    """Core ConditioningAverage and ConditioningConcat on two Sana text encodings: core's own math on the tensors,
    and the same combination of their attention masks and of their negative sides (the plain encodings
    `SanaModel` samples negatives with). An average at strength 1 / 0 is then each prompt (core keeps the first
    prompt's mask only: at 0 the second prompt's tokens were cut or padding attended), 0.5 the average of their
    tokens wherever either has one; a concat attends both prompts' tokens as a positive and as a negative.
    Other conditionings go to core unchanged. Wraps the two node methods once (the same classes on 0.3.64 and
    0.38)."""
    import nodes

    for cls, method, masks in ((nodes.ConditioningAverage, "addWeighted", _average_masks),
                               (nodes.ConditioningConcat, "concat", _concat_masks)):
        wrap_once(cls, method, functools.partial(_with_sana_sides, combine_masks=masks))


def _with_sana_sides(core: Callable, combine_masks: Callable) -> Callable:
    """Core's method `core(self, conditioning_to, conditioning_from, **widgets)`, whose entries of two Sana text
    encodings also get the combined masks (`combine_masks(to_mask, from_mask, tokens, **widgets)`) and negative
    sides (core's method on the plain encodings)."""
    from .clip import SANA_CHI, SANA_PLAIN, encoded_sides

    signature = inspect.signature(core)

    @functools.wraps(core)
    def method(*args: object, **kwargs: object) -> tuple[list]:
        widgets = signature.bind(*args, **kwargs).arguments  # as called by ComfyUI (keywords) or another pack
        self, conditioning_to, conditioning_from = (widgets.pop(k) for k in list(widgets)[:3])
        (out,) = core(self, conditioning_to=conditioning_to, conditioning_from=conditioning_from, **widgets)
        source = encoded_sides(*conditioning_from[0]) if conditioning_from else None
        if source is None:
            return (out,)
        combined = []
        for (embeds, extras), (tensor, new) in zip(conditioning_to, out):
            target = encoded_sides(embeds, extras)
            if target is not None:
                (_, to_mask), (to_plain, to_plain_mask) = target
                (_, from_mask), (from_plain, from_plain_mask) = source
                ((plain, _),) = core(self, conditioning_to=[[to_plain, {}]], conditioning_from=[[from_plain, {}]],
                                     **widgets)[0]
                new = {**new, "attention_mask": combine_masks(to_mask, from_mask, tensor.shape[1], **widgets),
                       SANA_PLAIN: (plain, combine_masks(to_plain_mask, from_plain_mask, plain.shape[1], **widgets)),
                       SANA_CHI: tensor}
            combined.append([tensor, new])
        return (combined,)

    return method


def _average_masks(to: torch.Tensor, source: torch.Tensor, tokens: int,
                   conditioning_to_strength: float) -> torch.Tensor:
    """The mask (B, tokens) of core's average s * to + (1 - s) * from (from cut or zero-padded to `tokens`): a
    token is attended where a prompt with a non-zero weight has one."""
    source = torch.nn.functional.pad(source[:, :tokens], (0, max(0, tokens - source.shape[1]))).to(to.device)
    keep = (to.bool() & (conditioning_to_strength > 0)) | (source.bool() & (conditioning_to_strength < 1))
    return keep.to(to.dtype)


def _concat_masks(to: torch.Tensor, source: torch.Tensor, tokens: int) -> torch.Tensor:
    """The mask (B, tokens) of core's concat [to | from] along the tokens."""
    return torch.cat([to, source.to(to)], dim=1)
