"""Gemma-2 text encoder: embeddings and masks vs diffusers' SanaPipeline.encode_prompt, every file layout, errors.

Oracle: diffusers SanaPipeline with the tiny Gemma loaded the diffusers way (transformers ``from_pretrained`` +
``AutoTokenizer``). Tolerance in fp32: rtol = atol = 1e-5 (the outputs are in fact bit-identical); bf16 is compared
to diffusers in bf16 with the same bound.
"""
from __future__ import annotations

import inspect
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Gemma2Model, GemmaTokenizer

from sana_core.checkpoints import CheckpointError
from sana_core.checkpoints.gemma import GEMMA2_2B, gemma2_config, load_text_encoder, tokenizer_from_spm
from sana_core.text_encoder import COMPLEX_HUMAN_INSTRUCTION, SanaTextEncoder
from sana_core.tiny import write_tiny_gemma

# Different lengths (own masks), case and spaces (diffusers lower-cases and strips), unicode/tab/newline (byte
# fallback), and one prompt longer than the 300 tokens (truncation).
PROMPTS = ["a cat", "  An Astronaut riding a HORSE on the moon, 35mm photo, 4k  ",
           "héllo wörld ✨\tand\nnew lines in a longer prompt with more words", "word " * 400]
TOL = dict(rtol=1e-5, atol=1e-5)


def diffusers_chi() -> list[str]:
    from diffusers import SanaPipeline
    return inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


def diffusers_encode(folder: Path, use_chi: bool, dtype: torch.dtype = torch.float32, max_length: int = 300):
    """(prompt_embeds, prompt_mask, negative_embeds, negative_mask) from diffusers for PROMPTS and negative ""."""
    from diffusers import SanaPipeline
    pipe = SanaPipeline(tokenizer=AutoTokenizer.from_pretrained(folder), vae=None, transformer=None, scheduler=None,
                        text_encoder=Gemma2Model.from_pretrained(folder, dtype=dtype))
    return pipe.encode_prompt(PROMPTS, negative_prompt="", device=torch.device("cpu"), max_sequence_length=max_length,
                              complex_human_instruction=diffusers_chi() if use_chi else None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gemma")
    return write_tiny_gemma(root / "hf", single_file=root / "gemma_2_2b.safetensors"), root / "gemma_2_2b.safetensors"


@pytest.fixture(scope="module")
def encoder(tiny):
    return load_text_encoder(tiny[0], dtype=torch.float32)


def test_chi_is_diffusers_default():
    assert list(COMPLEX_HUMAN_INSTRUCTION) == diffusers_chi()


@pytest.mark.parametrize("use_chi, max_length", [(True, 300), (False, 300), (True, 120)])
def test_encode_matches_diffusers(tiny, encoder, use_chi, max_length):
    embeds, mask, neg_embeds, neg_mask = diffusers_encode(tiny[0], use_chi, max_length=max_length)
    ours, our_mask = encoder.encode(PROMPTS, use_chi=use_chi, max_length=max_length)
    assert ours.shape == (len(PROMPTS), max_length, 64) and our_mask.dtype == torch.int64
    assert len(set(our_mask.sum(1).tolist())) == len(PROMPTS), "each prompt must keep its own mask"
    assert torch.equal(our_mask, mask)
    _same_real_rows(ours, embeds, mask)
    ours, our_mask = encoder.encode([""] * len(PROMPTS), use_chi=False, max_length=max_length)
    assert torch.equal(our_mask, neg_mask) and our_mask.sum() == len(PROMPTS)  # BOS only
    _same_real_rows(ours, neg_embeds, neg_mask)


def _same_real_rows(ours, theirs, mask):
    """Equal on real tokens; padding rows, which the DiT never attends, are zeros (Gemma skips them)."""
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], **TOL)
    assert torch.count_nonzero(ours[~real]) == 0


def test_cache_gives_the_uncached_values(encoder):
    cached = SanaTextEncoder(encoder.model, encoder.tokenizer, cache_size=2)
    batch = [PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    first = cached.encode(batch)
    assert len(cached.cache) == 2 and len(encoder.cache) == 0  # the default (cache_size 0) keeps nothing
    again = cached.encode(batch)  # all three rows from the cache
    for i, prompt in enumerate(batch):
        for a, b, c in zip(first, again, encoder.encode([prompt])):
            torch.testing.assert_close(a[i], c[0], **TOL)
            assert torch.equal(a[i], b[i])
    cached.encode(PROMPTS[2], use_chi=False)
    assert len(cached.cache) == 2 and (PROMPTS[0], True, 300, encoder.device, encoder.dtype) not in cached.cache


def test_softcapping_is_exercised(encoder):
    """The tiny weights make attention logits large enough that Gemma-2's softcapping changes the output."""
    assert encoder.model.config._attn_implementation == "eager"
    reference, _ = encoder.encode(PROMPTS[:2])
    attentions = [layer.self_attn for layer in encoder.model.layers]
    try:
        for attention in attentions:
            attention.attn_logit_softcapping = None
        uncapped, _ = encoder.encode(PROMPTS[:2])
    finally:
        for attention in attentions:
            attention.attn_logit_softcapping = GEMMA2_2B["attn_logit_softcapping"]
    assert (uncapped - reference).abs().max() > 1e-3


def test_every_layout_gives_the_same_embeddings(tiny, encoder, tmp_path):
    folder, single = tiny
    # Sana diffusers root, written by transformers: Gemma2Model keys without the "model." prefix, here sharded.
    Gemma2Model.from_pretrained(folder).save_pretrained(tmp_path / "sana" / "text_encoder", max_shard_size="300KB")
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "sana" / "tokenizer")
    (tmp_path / "sana" / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    shards = sorted((tmp_path / "sana" / "text_encoder").glob("model-*.safetensors"))
    assert len(shards) > 1 and "layers.0.self_attn.q_proj.weight" in {k for f in shards for k in load_file(f)}
    # HF folder with the sentencepiece model only (no tokenizer.json).
    spm_only = shutil.copytree(folder, tmp_path / "spm_only",
                               ignore=shutil.ignore_patterns("tokenizer.json", "tokenizer_config.json"))

    reference = encoder.encode(PROMPTS)
    for path, tokenizer_path in [(tmp_path / "sana", None), (spm_only, None), (single, None),
                                 (single, folder / "tokenizer.model"), (single, folder)]:
        other = load_text_encoder(path, tokenizer_path=tokenizer_path)
        assert all(t.device.type == "cpu" for t in [*other.parameters(), *other.buffers()])  # nothing left on meta
        assert all(p.dtype == torch.float32 for p in other.parameters())
        for ours, theirs in zip(other.encode(PROMPTS), reference):
            assert torch.equal(ours, theirs), (path, tokenizer_path)


def test_spm_tokenizer_matches_sentencepiece_and_transformers(tiny, tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")  # transformers' own .model conversion needs it; ours does not
    data = (tiny[0] / "tokenizer.model").read_bytes()
    shutil.copy(tiny[0] / "tokenizer.model", tmp_path / "tokenizer.model")
    transformers_conversion = GemmaTokenizer.from_pretrained(tmp_path, add_bos_token=True)
    ours, spm = tokenizer_from_spm(data, "test"), sentencepiece.SentencePieceProcessor(model_proto=data)
    chi = "\n".join(COMPLEX_HUMAN_INSTRUCTION)
    for text in [*PROMPTS, *(chi + p.lower() for p in PROMPTS), "digits 1234567 ÜNICODE ✨ 日本  two  spaces"]:
        ids = ours(text).input_ids
        assert ids == [2, *spm.encode(text)] == transformers_conversion(text).input_ids, text


def test_runtime_needs_no_sentencepiece_or_protobuf(tiny, encoder, monkeypatch):
    for module in ("sentencepiece", "google.protobuf"):
        monkeypatch.setitem(sys.modules, module, None)  # any import now raises ImportError
    reference = encoder.encode(PROMPTS[:2])
    for path in tiny:
        assert all(torch.equal(a, b) for a, b in zip(load_text_encoder(path).encode(PROMPTS[:2]), reference))


def test_float16_is_upcast_and_bf16_matches_diffusers(tiny, caplog):
    with caplog.at_level(logging.WARNING):
        encoder = load_text_encoder(tiny[1], dtype=torch.float16)
    assert encoder.dtype == torch.bfloat16 and "float16" in caplog.text
    embeds, mask, _, _ = diffusers_encode(tiny[0], use_chi=True, dtype=torch.bfloat16)
    ours, our_mask = encoder.encode(PROMPTS)
    assert ours.dtype == torch.bfloat16 and torch.equal(our_mask, mask)
    _same_real_rows(ours, embeds, mask)
    with pytest.raises(ValueError, match="float64"):
        load_text_encoder(tiny[1], dtype=torch.float64)


def test_config_from_real_gemma_2_2b_shapes():
    shapes = {"embed_tokens.weight": (256000, 2304), "layers.0.self_attn.q_proj.weight": (2048, 2304),
              "layers.0.self_attn.k_proj.weight": (1024, 2304), "layers.0.mlp.gate_proj.weight": (9216, 2304),
              **{f"layers.{i}.input_layernorm.weight": (2304,) for i in range(26)}}
    config = gemma2_config({k: torch.empty(s, device="meta") for k, s in shapes.items()}, "meta")
    assert {k: getattr(config, k) for k in GEMMA2_2B} == GEMMA2_2B


def test_missing_tokenizer(tiny, tmp_path):
    folder = shutil.copytree(tiny[0], tmp_path / "no_tokenizer", ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(FileNotFoundError, match="no_tokenizer: no tokenizer.*tokenizer.json.*tokenizer.model"):
        load_text_encoder(folder)
    sd = load_file(tiny[1])
    del sd["spiece_model"]
    save_file(sd, tmp_path / "bare.safetensors")
    with pytest.raises(FileNotFoundError, match="bare.safetensors.*spiece_model"):
        load_text_encoder(tmp_path / "bare.safetensors")


def test_mismatched_tokenizer(tiny, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    foreign = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=foreign, unk_token="<unk>").save_pretrained(tmp_path / "foreign")
    with pytest.raises(CheckpointError, match="foreign: tokenizer does not fit.*expected a Gemma tokenizer"):
        load_text_encoder(tiny[1], tokenizer_path=tmp_path / "foreign")
    sentencepiece = pytest.importorskip("sentencepiece")
    unigram = tmp_path / "unigram"
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(COMPLEX_HUMAN_INSTRUCTION), model_type="unigram",
                                             model_prefix=str(unigram), vocab_size=100, minloglevel=2)
    with pytest.raises(CheckpointError, match="unigram.model: not a Gemma sentencepiece model"):
        load_text_encoder(tiny[1], tokenizer_path=tmp_path / "unigram.model")


@pytest.mark.parametrize("keys, found", [
    (["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight"], "SDXL UNet"),
    (["x_embedder.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.q_norm.weight"], "DiT"),
    ([f"model.layers.0.{k}" for k in ("self_attn.q_norm.weight", "post_feedforward_layernorm.weight")], "Gemma-3"),
])
def test_wrong_model_file(tmp_path, keys, found):
    save_file({k: torch.zeros(2, 2) for k in keys}, tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match=f"wrong.safetensors: not a Gemma-2 text encoder: it looks like .*{found}.*"
                                              "expected Gemma-2"):
        load_text_encoder(tmp_path / "wrong.safetensors")


def test_wrong_config(tiny, tmp_path):
    folder = shutil.copytree(tiny[0], tmp_path / "t5")
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5EncoderModel"]}))
    with pytest.raises(CheckpointError, match="config.json: model_type is 't5'.*expected 'gemma2'"):
        load_text_encoder(folder)
    config = json.loads((tiny[0] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3, "layer_types": None}))
    with pytest.raises(CheckpointError, match="weights do not fit.*missing keys.*layers.2"):
        load_text_encoder(folder)


def test_truncated_files(tiny, tmp_path):
    data = tiny[1].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated"):
        load_text_encoder(tmp_path / "cut.safetensors")
    folder = shutil.copytree(tiny[0], tmp_path / "cut")
    (folder / "model.safetensors").write_bytes((tiny[0] / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_text_encoder(folder)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes((tiny[0] / "tokenizer.model").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="tokenizer.model: not a sentencepiece model"):
        load_text_encoder(folder)


def test_cached_instruction_prefix_equals_the_full_run(encoder, monkeypatch):
    """The instruction's keys/values are computed once and reused; the result equals running Gemma on all."""
    fresh = SanaTextEncoder(encoder.model, encoder.tokenizer)
    cached = fresh.encode(PROMPTS)
    assert fresh._prefix_cache is not None
    prefix_ids = fresh._prefix_cache[1][0]
    assert len(prefix_ids) == fresh.chi_length - 1 > 10
    again = fresh.encode(PROMPTS[:1])  # a second call reuses the cache, batch of another size
    monkeypatch.setattr(SanaTextEncoder, "_prefix", lambda self, chi: None)
    full = SanaTextEncoder(encoder.model, encoder.tokenizer).encode(PROMPTS)
    assert torch.equal(cached[1], full[1])
    torch.testing.assert_close(cached[0], full[0], **TOL)
    torch.testing.assert_close(again[0][0], full[0][0], **TOL)
