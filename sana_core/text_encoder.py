"""Sana's text encoder: Gemma-2-2B-IT (decoder only, final normed hidden states) + the complex human instruction.

Reproduces diffusers' ``SanaPipeline.encode_prompt`` exactly (docs: sana.md, "Text encoder"):

- prompts are lower-cased and stripped (diffusers' ``_text_preprocessing`` with ``clean_caption=False``);
- positive: CHI + prompt, padded on the right / truncated to ``len(chi_tokens) + max_length - 2`` tokens
  (``chi_tokens`` counts the BOS); the kept rows are BOS + the last ``max_length - 1``, so the CHI is dropped
  and the DiT always sees ``max_length`` tokens;
- negative: the prompt alone (no CHI), ``max_length`` tokens.

Each prompt keeps its own attention mask; padding rows are zeros (Gemma does not run on them). Load one with
:func:`sana_core.checkpoints.gemma.load_text_encoder`.
"""
from __future__ import annotations

import copy
import inspect
import logging
from collections import OrderedDict

import torch
from transformers import Gemma2Model, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# diffusers SanaPipeline.__call__'s default `complex_human_instruction` (joined with "\n", prompt appended).
COMPLEX_HUMAN_INSTRUCTION: tuple[str, ...] = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",  # noqa: E501
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",  # noqa: E501
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",  # noqa: E501
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",  # noqa: E501
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",  # noqa: E501
    "User Prompt: ",
)


class SanaTextEncoder(torch.nn.Module):
    """Gemma-2 decoder and its tokenizer, encoding prompts into Sana's caption embeddings.

    Repeated prompts of a batch (e.g. the negative ``[""] * B``) are encoded once, and every prompt alone: its
    embedding is then the same bits whatever prompts share its batch (Gemma run on a batch padded to its longest
    prompt rounds differently, ~1e-5, as CPU kernels do for other shapes). With ``cache_size > 0`` the
    results of that many recent distinct prompts are also kept across calls (per device and dtype); clear
    ``self.cache`` after changing the weights in place (e.g. a LoRA), or the cached embeddings go stale.
    """

    def __init__(self, model: Gemma2Model, tokenizer: PreTrainedTokenizerBase, cache_size: int = 0):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.chi_prompt = "\n".join(COMPLEX_HUMAN_INSTRUCTION)
        self.chi_length = len(tokenizer.encode(self.chi_prompt))  # with the BOS, as diffusers counts it
        self.cache_size = cache_size
        self.cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._prefix_cache: tuple | None = None  # ((device, dtype, chi), (ids, BOS state, KV cache)) of an instruction
        # the KV cache (argument and output) is `cache` from transformers 5 on, `past_key_values` before
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.no_grad()
    def encode(self, prompts: str | list[str], use_chi: bool = True, max_length: int = 300,
               chi: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption embeddings ``[B, max_length, D]`` (model dtype) and attention mask ``[B, max_length]`` (int64).

        ``use_chi=True`` for positive prompts, ``False`` for the negative prompt (diffusers: ``""``); ``chi``
        replaces Sana's complex human instruction (diffusers' ``complex_human_instruction`` lines joined by
        newlines) and ``max_length`` the 300 caption tokens (diffusers' ``max_sequence_length``).
        """
        chi = self.chi_prompt if chi is None else chi
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or max_length < 2:
            raise ValueError(f"need at least one prompt and max_length >= 2, got {len(prompts)} prompts, "
                             f"max_length {max_length}")
        keys = [(p.lower().strip(), use_chi and chi, max_length, self.device, self.dtype) for p in prompts]
        new = [key for key in dict.fromkeys(keys) if key not in self.cache]
        for key in new:  # each prompt alone (see the class docstring)
            embeds, mask = self._encode([key[0]], use_chi, max_length, chi)
            self.cache[key] = embeds[0], mask[0]
        rows = [self.cache[key] for key in keys]
        for key in keys:
            self.cache.move_to_end(key)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return torch.stack([e for e, _ in rows]), torch.stack([m for _, m in rows])

    def _encode(self, texts: list[str], use_chi: bool, max_length: int,
                chi: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' ``_get_gemma_prompt_embeds`` + ``select_index`` for preprocessed texts, faster and exact:

        - Gemma does not run on padding: the model is causal and padding is on the right, so the real tokens'
          states are the same; the rows of padding tokens (mask 0, never attended by the DiT) are zeros;
        - with the instruction, its tokens (but the last, which may merge with the prompt) are a constant
          prefix: their keys/values are computed once per device and dtype and reused (`_prefix`).
        """
        total, chi = max_length, self.chi_prompt if chi is None else chi
        if use_chi:
            texts = [chi + t for t in texts]
            total = self._chi_length(chi) + max_length - 2
        tokens = self.tokenizer(texts, padding="longest", max_length=total, truncation=True,
                                padding_side="right", return_tensors="pt")
        if bool(tokens.attention_mask[:, -1].all()):  # some text filled every row: say what was cut
            skip = len(chi) if use_chi else 0
            for text, n in zip(texts, map(len, self.tokenizer(texts).input_ids)):
                if n > total:
                    log.warning("the prompt %r is longer than Sana reads (max_length %d tokens): its last %d "
                                "tokens are cut", text[skip:skip + 60] + "...", max_length, n - total)
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)  # [B, n <= total]
        prefix = self._prefix(chi) if use_chi else None
        if prefix is not None and bool((ids[:, :prefix[0].shape[0]] == prefix[0]).all()):
            hidden = self._after_prefix(ids, mask, *prefix)
        else:
            hidden = self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # [B, n, D]
        hidden = hidden * mask[..., None].to(hidden.dtype)
        pad = total - ids.shape[1]
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, pad))                 # [B, total, D]
        mask = torch.nn.functional.pad(mask, (0, pad))
        keep = [0, *range(total - max_length + 1, total)]  # BOS + the last max_length - 1 rows
        return hidden[:, keep], mask[:, keep]

    def _chi_length(self, chi: str) -> int:
        """Tokens of an instruction, with the BOS, as diffusers counts them."""
        return self.chi_length if chi == self.chi_prompt else len(self.tokenizer.encode(chi))

    def _prefix(self, chi: str) -> tuple[torch.Tensor, torch.Tensor, object]:
        """(prefix ids [P], its BOS state [D], its KV cache) for an instruction, on the model's device/dtype."""
        key = (self.device, self.dtype, chi)
        if self._prefix_cache is None or self._prefix_cache[0] != key:
            ids = torch.tensor(self.tokenizer(chi).input_ids[:-1], device=self.device)
            out = self.model(input_ids=ids[None], use_cache=True)
            self._prefix_cache = key, (ids, out.last_hidden_state[0, 0], getattr(out, self._cache_arg))
        return self._prefix_cache[1]

    def _after_prefix(self, ids: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor, bos: torch.Tensor,
                      cache: object) -> torch.Tensor:
        """Hidden states [B, n, D] of ids that start with `prefix`, running Gemma on the rest only. Rows inside
        the prefix other than BOS (never kept) are zeros."""
        B, P = ids.shape[0], prefix.shape[0]
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(B)
        rest = self.model(input_ids=ids[:, P:], attention_mask=mask, use_cache=True,
                          **{self._cache_arg: cache}).last_hidden_state                    # [B, n - P, D]
        head = torch.zeros(B, P, rest.shape[-1], dtype=rest.dtype, device=rest.device)
        head[:, 0] = bos
        return torch.cat([head, rest], dim=1)
