"""Gemma-2 text encoder files: HF and diffusers folders, ComfyUI single files, and the Gemma tokenizer.

Layouts (docs: checkpoints.md, "Gemma-2-2B-IT"):

- HF folder (``google/gemma-2-2b-it``): ``config.json``, ``model*.safetensors`` (possibly sharded) with
  ``model.layers.N...`` keys (Gemma2ForCausalLM; ``lm_head`` is tied and not stored), ``tokenizer.json`` and/or
  ``tokenizer.model``.
- Sana diffusers root: ``text_encoder/`` (Gemma2Model, bare ``layers.N...`` keys) + ``tokenizer/``.
- ComfyUI single file (``gemma_2_2b_fp16.safetensors``): ``model.layers.N...`` keys, no config, and the
  sentencepiece model stored as a uint8 tensor ``spiece_model``.
- llama.cpp GGUF (``gemma-2-2b-it-Q8_0.gguf``): ``blk.N.attn_q.weight``... names, norm weights stored as
  1 + w, the config and the tokenizer's pieces in the metadata; quantized matrices stay quantized.

A sentencepiece model (``tokenizer.model`` or ``spiece_model``) is read with a small protobuf reader and turned
into a ``tokenizers`` BPE the way transformers converts Gemma's, so neither sentencepiece nor protobuf is needed.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import AutoTokenizer, Gemma2Config, Gemma2Model, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..precision import text_encoder_dtype
from ..text_encoder import SanaTextEncoder
from ..quantized import is_quantized, swap_layers
from .files import (CheckpointError, PathLike, cast_state_dict, describe_keys, find_weights_file, load_strict,
                    read_json, read_state_dict, strip_prefixes)

# Gemma-2-2B(-IT): the values that key shapes cannot tell are taken from here (RoPE theta 10000 is the default).
GEMMA2_2B = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)
_ANCHOR = "layers.0.post_feedforward_layernorm.weight"  # Gemma-2/3 only; also locates the key prefix
_REQUIRED = ("embed_tokens.weight", "norm.weight", "layers.0.self_attn.q_proj.weight",
             "layers.0.self_attn.k_proj.weight", "layers.0.mlp.gate_proj.weight", _ANCHOR)
# sentencepiece ModelProto: pieces = 1 {piece = 1, score = 2, type = 3}, trainer_spec = 2 {model_type = 3},
# normalizer_spec = 3 {add_dummy_prefix = 3, remove_extra_whitespaces = 4}. Piece types: 3 control, 4 user-defined.
_CONTROL, _USER_DEFINED = 3, 4
_GEMMA_SPM = {"model_type": 2, "add_dummy_prefix": 0, "remove_extra_whitespaces": 0,  # BPE, raw whitespace
              "first pieces": ["<pad>", "<eos>", "<bos>", "<unk>"]}


def load_text_encoder(path: PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                      tokenizer_path: PathLike | None = None) -> SanaTextEncoder:
    """Load Gemma-2 + tokenizer from an HF folder, a Sana diffusers root, or a ComfyUI single file.

    ``dtype``: bfloat16 or float32 (float16 is upcast, see :func:`~sana_core.precision.text_encoder_dtype`);
    None = bfloat16 on CUDA, float32 elsewhere. ``tokenizer_path`` (folder, ``tokenizer.json`` or
    ``tokenizer.model``) overrides the tokenizer found next to the weights or inside the single file.
    The model is built on ``meta`` and the weights are cast tensor by tensor, so only one copy is alive.
    """
    path = Path(path)
    dtype = text_encoder_dtype(dtype, device)
    if path.suffix.lower() == ".gguf":
        return load_llama_cpp_gemma(path, dtype, device, tokenizer_path)
    if path.is_dir():
        model_dir = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        config = _read_config(model_dir / "config.json")
        tokenizer_source = Path(tokenizer_path or (path / "tokenizer" if model_dir != path else path))
        tokenizer = load_tokenizer(tokenizer_source)  # before reading gigabytes of weights
        weights = find_weights_file(model_dir, ("model",))
        sd, _ = _read_weights(weights, dtype)
    else:
        weights = path
        sd, spiece = _read_weights(path, dtype)
        config = gemma2_config(sd, path)
        if tokenizer_path is not None:
            tokenizer_source = Path(tokenizer_path)
            tokenizer = load_tokenizer(tokenizer_source)
        elif spiece is not None:
            tokenizer_source = f"{path} ['spiece_model']"
            tokenizer = tokenizer_from_spm(spiece, tokenizer_source)
        else:
            raise FileNotFoundError(f"{path}: no tokenizer: the file has no 'spiece_model' tensor (ComfyUI's "
                                    "embedded Gemma tokenizer); pass tokenizer_path= a folder with tokenizer.json "
                                    "or tokenizer.model")
    check_tokenizer(tokenizer, config.vocab_size, tokenizer_source)
    return SanaTextEncoder(build_gemma2(config, sd, weights, dtype, device), tokenizer)


def build_gemma2(config: Gemma2Config, sd: dict[str, torch.Tensor], source: PathLike | str,
                 dtype: torch.dtype, device: torch.device | str) -> Gemma2Model:
    """Gemma2Model strict-loaded from bare keys, with eager attention as diffusers gets it from ``from_pretrained``
    (SDPA has no logit softcapping). ``sd`` is emptied while casting."""
    config._attn_implementation = "eager"
    with _parameters_on_meta():
        model = Gemma2Model(config)
    swap_layers(model, lambda key: is_quantized(sd.get(key)), dtype)  # GGUF: quantized layers dequantize per call
    weights = cast_state_dict(sd, dtype)
    load_strict(model, weights, source)
    del weights
    return model.to(device).eval().requires_grad_(False)


def gemma2_config(sd: dict[str, torch.Tensor], source: PathLike | str) -> Gemma2Config:
    """Config from the shapes of bare Gemma-2 keys; head_dim (256), softcaps, window, eps and RoPE are Gemma-2-2B's."""
    vocab, hidden = sd["embed_tokens.weight"].shape
    q_out, kv_out = sd["layers.0.self_attn.q_proj.weight"].shape[0], sd["layers.0.self_attn.k_proj.weight"].shape[0]
    head_dim = GEMMA2_2B["head_dim"]
    if q_out % head_dim or kv_out % head_dim:
        raise CheckpointError(f"{source}: q/k projections have {q_out}/{kv_out} outputs; expected multiples of "
                              f"Gemma-2's head_dim {head_dim}")
    return Gemma2Config(**{
        **GEMMA2_2B, "vocab_size": vocab, "hidden_size": hidden,
        "num_hidden_layers": len({k.split(".")[1] for k in sd if k.startswith("layers.")}),
        "num_attention_heads": q_out // head_dim, "num_key_value_heads": kv_out // head_dim,
        "intermediate_size": sd["layers.0.mlp.gate_proj.weight"].shape[0],
    })


def load_tokenizer(path: PathLike) -> PreTrainedTokenizerBase:
    """Gemma tokenizer from a folder (``tokenizer.json`` preferred, else ``tokenizer.model``) or either file."""
    path = Path(path)
    expected = "a Gemma tokenizer.json (+ tokenizer_config.json) or tokenizer.model"
    if path.is_file() and path.suffix == ".model":
        return tokenizer_from_spm(path.read_bytes(), path)
    folder = path.parent if path.is_file() and path.suffix == ".json" else path
    if (folder / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{folder}: cannot load the tokenizer ({e}); expected {expected}") from e
    if (folder / "tokenizer.model").is_file():
        return tokenizer_from_spm((folder / "tokenizer.model").read_bytes(), folder / "tokenizer.model")
    raise FileNotFoundError(f"{path}: no tokenizer there (expected {expected})")


def tokenizer_from_spm(data: bytes, source: PathLike | str) -> PreTrainedTokenizerFast:
    """Fast tokenizer from a serialized Gemma sentencepiece model, built as transformers converts one: BPE over
    the pieces in id order with byte fallback, merges from the vocabulary, spaces as "▁" without a dummy prefix,
    control pieces special and user-defined pieces added, BOS prepended."""
    try:
        pieces, spec = _read_spm(data)
    except (ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source}: not a sentencepiece model ({type(e).__name__}: {e})") from e
    if spec != _GEMMA_SPM:
        raise CheckpointError(f"{source}: not a Gemma sentencepiece model: found {spec}, expected {_GEMMA_SPM}")
    return tokenizer_from_pieces(pieces)


def tokenizer_from_pieces(pieces: list[tuple[str, int]]) -> PreTrainedTokenizerFast:
    """The fast tokenizer of Gemma's sentencepiece pieces (piece, sentencepiece type) in id order (see
    `tokenizer_from_spm`; llama.cpp's GGUF keeps the same pieces and types)."""
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(vocab), unk_token="<unk>", fuse_unk=True,
                                   byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", vocab["<bos>"])])
    backend.add_special_tokens([AddedToken(p, normalized=False, special=True)
                                for p, kind in pieces if kind == _CONTROL])
    backend.add_tokens([AddedToken(p, normalized=False) for p, kind in pieces if kind == _USER_DEFINED])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_size: int, source: PathLike | str) -> None:
    """Raise unless the tokenizer has Gemma's special ids (pad 0, eos 1, bos 2, BOS added) and fits the embedding."""
    first = tokenizer("a").input_ids[:1]
    found = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, first)
    if found != (0, 1, 2, [2]) or len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"{source}: tokenizer does not fit this Gemma-2 model: found pad/eos/bos ids {found[:3]}, first token "
            f"{first}, {len(tokenizer)} tokens; expected a Gemma tokenizer with pad 0, eos 1, bos 2 (added first) "
            f"and at most {vocab_size} tokens")


#: llama.cpp's names of a Gemma-2 block's tensors -> Gemma2Model's (convert_hf_to_gguf.py, Gemma2Model).
LLAMA_CPP_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
LLAMA_CPP_TOP = {"token_embd": "embed_tokens", "output_norm": "norm"}
#: sentencepiece / GGUF token types (the same numbers): normal, unknown, control, user-defined, byte.
_NORMAL, _UNKNOWN, _BYTE = 1, 2, 6


def _rename(name: str, top: dict[str, str], block: dict[str, str], block_prefix: tuple[str, str]) -> str | None:
    stem, _, suffix = name.rpartition(".")
    if stem in top:
        return f"{top[stem]}.{suffix}"
    m = re.fullmatch(re.escape(block_prefix[0]) + r"(\d+)\.(.+)", stem)
    if m and m.group(2) in block:
        return f"{block_prefix[1]}{m.group(1)}.{block[m.group(2)]}.{suffix}"
    return None


def llama_cpp_to_gemma(sd: dict[str, torch.Tensor], source: PathLike | str) -> dict[str, torch.Tensor]:
    """llama.cpp Gemma-2 tensors -> bare Gemma2Model keys; norm weights back from 1 + w to w (float32)."""
    out = {}
    for name in list(sd):
        ours = _rename(name, LLAMA_CPP_TOP, LLAMA_CPP_BLOCK, ("blk.", "layers."))
        if ours is None:
            if name != "output.weight":  # an untied output head: Sana reads the hidden states only
                raise CheckpointError(f"{source}: unexpected tensor {name!r} in a llama.cpp Gemma-2 GGUF")
            sd.pop(name)
            continue
        t = sd.pop(name)
        out[ours] = t.float() - 1 if ours.endswith("norm.weight") else t
    return out


def gemma_to_llama_cpp(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare Gemma2Model keys -> llama.cpp's names, norm weights as 1 + w (float32), as its converter writes."""
    top = {v: k for k, v in LLAMA_CPP_TOP.items()}
    block = {v: k for k, v in LLAMA_CPP_BLOCK.items()}
    out = {}
    for name, t in sd.items():
        theirs = _rename(name, top, block, ("layers.", "blk."))
        if theirs is None:
            raise CheckpointError(f"Gemma-2 key {name!r} has no llama.cpp name")
        out[theirs] = t.float() + 1 if name.endswith("norm.weight") else t
    return out


def load_llama_cpp_gemma(path: Path, dtype: torch.dtype, device: torch.device | str,
                         tokenizer_path: PathLike | None = None) -> SanaTextEncoder:
    """Gemma-2 from a llama.cpp GGUF: config and tokenizer from its metadata (``tokenizer_path`` overrides the
    tokenizer), quantized matrices kept quantized (dequantized per call), the rest cast to ``dtype`` (resolved)."""
    from .gguf_files import read_gguf, read_metadata

    meta = read_metadata(path)
    arch = meta.get("general.architecture")
    if arch != "gemma2":
        raise CheckpointError(f"{path}: a GGUF of architecture {arch!r}; expected a llama.cpp Gemma-2 file "
                              "('gemma2', e.g. gemma-2-2b-it-Q8_0.gguf)")
    sd = llama_cpp_to_gemma(read_gguf(path), path)
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise CheckpointError(f"{path}: incomplete Gemma-2 GGUF, missing {[k for k in missing][:3]}")

    def get(key: str, default: object) -> object:
        return meta.get(f"gemma2.{key}", default)

    head_dim = int(get("attention.key_length", GEMMA2_2B["head_dim"]))
    config = Gemma2Config(**{
        **GEMMA2_2B, "vocab_size": sd["embed_tokens.weight"].shape[0], "hidden_size": int(get("embedding_length", 0)),
        "num_hidden_layers": int(get("block_count", 0)), "intermediate_size": int(get("feed_forward_length", 0)),
        "num_attention_heads": int(get("attention.head_count", 0)),
        "num_key_value_heads": int(get("attention.head_count_kv", 0)), "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", GEMMA2_2B["rms_norm_eps"])),
        "attn_logit_softcapping": float(get("attn_logit_softcapping", GEMMA2_2B["attn_logit_softcapping"])),
        "final_logit_softcapping": float(get("final_logit_softcapping", GEMMA2_2B["final_logit_softcapping"])),
        "sliding_window": int(get("attention.sliding_window", GEMMA2_2B["sliding_window"])),
        "max_position_embeddings": int(get("context_length", GEMMA2_2B["max_position_embeddings"]))})
    if tokenizer_path is not None:
        tokenizer, source = load_tokenizer(tokenizer_path), tokenizer_path
    else:
        tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
        if meta.get("tokenizer.ggml.model") != "llama" or not tokens or len(tokens) != len(types or ()):
            raise CheckpointError(f"{path}: no sentencepiece tokenizer in the metadata (tokenizer.ggml.model "
                                  f"{meta.get('tokenizer.ggml.model')!r}); pass tokenizer_path=")
        tokenizer, source = tokenizer_from_pieces(list(zip(tokens, map(int, types)))), f"{path} [tokenizer.ggml]"
    check_tokenizer(tokenizer, config.vocab_size, source)
    return SanaTextEncoder(build_gemma2(config, sd, path, dtype, device), tokenizer)


def write_llama_cpp_metadata(writer, config: Gemma2Config, tokenizer: PreTrainedTokenizerBase) -> None:
    """The metadata llama.cpp's converter writes for Gemma-2 (hyper-parameters, sentencepiece tokenizer) on a
    `gguf.GGUFWriter`. Token types: <unk> unknown, other special tokens control, added ones user-defined,
    <0xNN> bytes, the rest normal; scores are minus the id (the merges follow the id order)."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                   if t.special}
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    types = [_UNKNOWN if p == tokenizer.unk_token else _CONTROL if p in special else _USER_DEFINED if p in added
             else _BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", p) else _NORMAL for p in pieces]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([-float(i) for i in range(len(pieces))])
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_space_prefix(False)


def _read_config(path: Path) -> Gemma2Config:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected a folder with a Gemma-2 config.json (HF layout) "
                                "or with a text_encoder/ subfolder (Sana diffusers layout)")
    config = read_json(path)
    if config.get("model_type") != "gemma2":
        raise CheckpointError(f"{path}: model_type is {config.get('model_type')!r} "
                              f"(architectures {config.get('architectures')}); expected 'gemma2' (Gemma-2-2B)")
    return Gemma2Config.from_dict(config)


def _read_weights(path: Path, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], bytes | None]:
    """Bare Gemma2Model keys of a weight file (cast to ``dtype``), and the embedded ``spiece_model`` bytes if any."""
    sd = read_state_dict(path, dtype)
    spiece = sd.pop("spiece_model", None)
    sd = strip_prefixes(sd, [_ANCHOR])  # "model." (CausalLM, ComfyUI) or none (Gemma2Model); drops lm_head
    missing = [k for k in _REQUIRED if k not in sd]
    if missing or any(".q_norm." in k for k in sd):
        raise CheckpointError(f"{path}: not a Gemma-2 text encoder: {describe_keys(dict(sorted(sd.items())))}; "
                              f"expected Gemma-2 keys such as 'model.{_ANCHOR}' and 'model.embed_tokens.weight'")
    return sd, None if spiece is None else spiece.numpy().tobytes()


def _read_spm(data: bytes) -> tuple[list[tuple[str, int]], dict[str, object]]:
    """(piece, type) list and the spec fields of :data:`_GEMMA_SPM` (with sentencepiece's defaults) of a model proto."""
    pieces, trainer, normalizer = [], {}, {}
    for field, value in _proto_fields(data):
        if field == 1:
            piece = dict(_proto_fields(value))
            pieces.append((piece[1].decode(), piece.get(3, 1)))
        elif field == 2:
            trainer = dict(_proto_fields(value))
        elif field == 3:
            normalizer = dict(_proto_fields(value))
    spec = {"model_type": trainer.get(3, 1), "add_dummy_prefix": normalizer.get(3, 1),
            "remove_extra_whitespaces": normalizer.get(4, 1), "first pieces": [p for p, _ in pieces[:4]]}
    return pieces, spec


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges of a sentencepiece vocabulary: every split of a piece into two pieces, ranked by the merged
    piece's id (sentencepiece's score order), then by the length of the left part (as transformers ranks them)."""
    return [(piece[:i], piece[i:]) for piece in sorted(vocab, key=vocab.get) for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab]


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of a protobuf message: varints as int, other wire types as raw bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield field, value
            continue
        if wire == 2:
            size, i = _varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i + size > len(buf):
            raise ValueError("truncated message")
        yield field, buf[i:i + size]
        i += size


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on ``meta`` (the checkpoint provides them) but buffers for real: Gemma2Model's
    non-persistent buffers (rotary ``inv_freq``, ``embed_scale``) are computed in ``__init__`` and never saved.
    Patches ``torch.nn.Module.register_parameter`` while active (as accelerate's ``init_empty_weights`` does)."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register
