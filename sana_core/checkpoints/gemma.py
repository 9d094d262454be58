"""Gemma-2 text encoder files: HF and diffusers folders, ComfyUI single files, and the Gemma tokenizer.

Layouts (docs: checkpoints.md, "Gemma-2-2B-IT"):

- HF folder (``google/gemma-2-2b-it``): ``config.json``, ``model*.safetensors`` (possibly sharded) with
  ``model.layers.N...`` keys (Gemma2ForCausalLM; ``lm_head`` is tied and not stored), ``tokenizer.json`` and/or
  ``tokenizer.model``.
- Sana diffusers root: ``text_encoder/`` (Gemma2Model, bare ``layers.N...`` keys) + ``tokenizer/``.
- ComfyUI single file (``gemma_2_2b_fp16.safetensors``): ``model.layers.N...`` keys, no config, and the
  sentencepiece model stored as a uint8 tensor ``spiece_model``.

A sentencepiece model (``tokenizer.model`` or ``spiece_model``) is read with a small protobuf reader and turned
into a ``tokenizers`` BPE the way transformers converts Gemma's, so neither sentencepiece nor protobuf is needed.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import AutoTokenizer, Gemma2Config, Gemma2Model, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..text_encoder import SanaTextEncoder, resolve_dtype
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

    ``dtype``: bfloat16 or float32 (float16 is upcast, see :func:`~sana_core.text_encoder.resolve_dtype`);
    None = bfloat16 on CUDA, float32 elsewhere. ``tokenizer_path`` (folder, ``tokenizer.json`` or
    ``tokenizer.model``) overrides the tokenizer found next to the weights or inside the single file.
    The model is built on ``meta`` and the weights are cast tensor by tensor, so only one copy is alive.
    """
    path = Path(path)
    dtype = resolve_dtype(dtype, device)
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
