"""Gemma-2 as a core `CLIP`: CLIPTextEncode and every prompt node taking a CLIP make Sana conditioning.

Sana encodes a positive prompt after its complex human instruction (CHI) and a negative one plain, but a text
node does not know which side it will be wired to. So the conditioning carries both: its tensor is the CHI
encoding (300 tokens, with `attention_mask`), and `SANA_PLAIN` holds the plain encoding, which `SanaModel` uses
when the conditioning is sampled as a negative (`negative_side`), unless a node changed the tensor since (then
the changed tensor is used as it is, with a warning). SanaGemmaTextEncode (role set by hand) carries its one
encoding on both sides. Core ConditioningAverage / ConditioningConcat combine both sides (`conditioning.install`).
"""
from __future__ import annotations

import inspect
import logging
import re

import comfy.model_management as mm
import comfy.sd
import comfy.supported_models_base
import torch

log = logging.getLogger(__name__)
TOKENS = "sana_gemma"       # the tokenizer output's key: one "token" per prompt, the text itself (Sana reads text)
SANA_PLAIN = "sana_plain"   # conditioning key: the negative side (embeds [1, 300, D], mask [1, 300]): plain encoding
SANA_CHI = "sana_chi"       # conditioning key: the tensor as encoded, to tell whether a node changed it
WEIGHTED = re.compile(r"\([^()]*:\s*-?[0-9.]+\s*\)")  # ComfyUI's (words:1.2) emphasis


class SanaTokenizer:
    """Core's tokenizer interface over raw text: Gemma's tokenizer runs inside the encoder, with the CHI."""

    def __init__(self, embedding_directory: str | None = None, tokenizer_data: dict | None = None):
        pass

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs: object) -> dict:
        if WEIGHTED.search(text):
            log.warning("Sana reads prompts as written, like NVlabs and diffusers: emphasis such as '(word:1.2)' is "
                        "not applied, its characters are part of the prompt")
        return {TOKENS: [[(text, 1.0)]]}

    def untokenize(self, token_weight_pair: list) -> list:
        return [(pair, pair[0]) for pair in token_weight_pair]

    def state_dict(self) -> dict:
        return {}


class SanaGemmaClip(torch.nn.Module):
    """The `cond_stage_model` of the Sana CLIP: a loaded `sana_core.text_encoder.SanaTextEncoder` (given through
    the ClipTarget's params) answering core's text-encoder calls."""

    def __init__(self, encoder: torch.nn.Module, dtype: torch.dtype | None = None, device: object = None,
                 model_options: dict | None = None):
        super().__init__()
        self.encoder = encoder
        self.dtypes = {encoder.dtype}

    def set_clip_options(self, options: dict) -> None:
        if options.get("layer") is not None:
            raise ValueError("CLIP Set Last Layer: Sana's DiT reads the final layer of Gemma-2, so another layer "
                             "cannot be used; remove that node")

    def reset_clip_options(self) -> None:
        pass

    def encode_token_weights(self, tokens: dict) -> tuple[torch.Tensor, None, dict]:
        """Caption embeddings [1, 300, D] with the instruction, no pooled output, and the extras: the attention
        mask and the plain (negative) encoding."""
        texts = [text for batch in tokens[TOKENS] for text, _ in batch]
        if len(texts) != 1:
            raise ValueError(f"Sana CLIP: expected one prompt, got {len(texts)}")
        out = mm.intermediate_device()
        chi, chi_mask = (t.to(out) for t in self.encoder.encode(texts, use_chi=True))
        plain, plain_mask = (t.to(out) for t in self.encoder.encode(texts, use_chi=False))
        return chi, None, {"attention_mask": chi_mask, SANA_PLAIN: (plain, plain_mask), SANA_CHI: chi}

    def load_sd(self, sd: dict) -> tuple[list, list]:
        return self.encoder.model.load_state_dict(sd, strict=False)


def sana_clip(encoder: torch.nn.Module, load_device: torch.device, offload_device: torch.device) -> comfy.sd.CLIP:
    """A core CLIP over a loaded Sana text encoder, placed and offloaded by ComfyUI's memory manager. Newer cores
    would stream it with Dynamic VRAM, which needs comfy.ops layers (Gemma is transformers'): opted out there."""
    target = comfy.supported_models_base.ClipTarget(SanaTokenizer, SanaGemmaClip)
    target.params = {"encoder": encoder}
    options = {"load_device": load_device, "offload_device": offload_device, "initial_device": encoder.device,
               "dtype": encoder.dtype}
    extra = {"disable_dynamic": True} if "disable_dynamic" in inspect.signature(comfy.sd.CLIP).parameters else {}
    return comfy.sd.CLIP(target=target, model_options=options, **extra)


def text_encoder(clip: object, node: str) -> torch.nn.Module:
    """The Sana text encoder of a CLIP from a Sana loader, loaded on its device; ValueError naming `node` for
    any other CLIP."""
    model = getattr(clip, "cond_stage_model", None)
    if not isinstance(model, SanaGemmaClip):
        raise ValueError(f"{node}: the CLIP is not Sana's Gemma-2 (load it with SanaGemmaLoader or SanaFolderLoader)")
    clip.load_model()
    return model.encoder


def negative_side(kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(caption embeds, mask) of a conditioning sampled as a negative: the plain encoding of a Sana CLIP's prompt,
    or what the conditioning holds if it came from elsewhere or a node changed its tensor."""
    context, mask, plain, chi = (kwargs.get(k) for k in ("cross_attn", "attention_mask", SANA_PLAIN, SANA_CHI))
    if plain is None or context is None:
        return context, mask
    if _as_encoded(context, chi):
        return plain
    log.warning("Sana: a negative prompt from a CLIP text node was changed by another node after encoding (e.g. "
                "ConditioningZeroOut); it is used as changed, so any text in it keeps the complex "
                "human instruction that Sana gives positive prompts only")
    return context, mask


def encoded_sides(embeds: torch.Tensor, extras: dict) -> tuple[tuple, tuple] | None:
    """((embeds, mask) as a positive, (embeds, mask) as a negative) of a conditioning entry (tensor, dict) from a
    Sana text node that no node changed since: embeds (B, T, D), masks (B, T). None for any other entry."""
    plain, chi, mask = (extras.get(k) for k in (SANA_PLAIN, SANA_CHI, "attention_mask"))
    if plain is None or mask is None or mask.shape[-1] != embeds.shape[1] or not _as_encoded(embeds, chi):
        return None
    return (embeds, mask), plain


def _as_encoded(context: torch.Tensor, chi: torch.Tensor | None) -> bool:
    """Whether a conditioning tensor is still the one its text node encoded (`SANA_CHI`)."""
    return chi is not None and (context is chi or (context.shape == chi.shape
                                                   and torch.equal(context.to(chi.device), chi)))
