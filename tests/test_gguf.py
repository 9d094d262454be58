"""GGUF weights: torch dequantization against the gguf package's numpy, our quantize command, a GGUF DiT in the
engine (images against the bf16 file), LoRAs on quantized weights."""
import gguf
import numpy as np
import pytest
import torch

from sana_core.checkpoints.dit import load_dit, save_dit
from sana_core.checkpoints.files import CheckpointError, read_state_dict
from sana_core.dit import DiTConfig, SanaDiT
from sana_core.quantize import main as quantize
from sana_core.quantize import quantize_array
from sana_core.quantized import QUANTIZED, GGUFOps, QuantizedTensor, T, dequantize, dequantize_raw
from sana_core.tiny import randomize_, write_tiny_pipeline

#: byte ranges of each type's float16 factors (random bytes there could be NaN/inf, which numpy and torch agree on
#: anyway, but finite factors make the comparison meaningful)
HALVES = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q5_0: (0,), T.Q4_1: (0, 2), T.Q5_1: (0, 2), T.Q4_K: (0, 2),
          T.Q5_K: (0, 2), T.Q6_K: (208,)}


def _random_blocks(qtype: T, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, blocks_per_row * size), dtype=np.uint8)
    flat = raw.reshape(-1, size)
    for at in HALVES[qtype]:
        flat[:, at:at + 2] = rng.standard_normal((len(flat), 1)).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_dequantization_equals_gguf_numpy_bit_for_bit(qtype):
    raw = _random_blocks(qtype, 16, 3)
    want = gguf.quants.dequantize(raw, qtype)
    got = dequantize_raw(torch.from_numpy(raw), qtype, want.shape)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


def _write(path, tensors: dict, arch: str = "test") -> None:
    """A GGUF with raw tensors: name -> (numpy array, GGML type or None for numpy's own)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reading_float_and_quantized_tensors(tmp_path):
    """F32/F16/BF16 become ordinary tensors equal to gguf's reading, quantized ones stay quantized with their
    logical shape; every type dequantizes to what gguf's numpy gives for the same file."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    bf16 = torch.from_numpy(x).to(torch.bfloat16).view(torch.uint8).numpy()
    tensors = {"f32": (x, None), "f16": (x.astype(np.float16), None), "bf16": (bf16, T.BF16),
               **{t.name: (_random_blocks(t, 4, 1), t) for t in (T.Q8_0, T.Q4_K)}}
    _write(tmp_path / "a.gguf", tensors)
    sd = read_state_dict(tmp_path / "a.gguf")
    assert [sd[k].dtype for k in ("f32", "f16", "bf16")] == [torch.float32, torch.float16, torch.bfloat16]
    assert isinstance(sd["Q4_K"], QuantizedTensor) and tuple(sd["Q4_K"].shape) == (4, 256)
    for t in gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors:
        want = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        assert np.array_equal(dequantize(sd[t.name], torch.float32).numpy().reshape(want.shape), want), t.name


def test_unsupported_type_is_an_error_naming_the_tensor(tmp_path):
    _write(tmp_path / "q2.gguf", {"blocks.0.attn.qkv.weight": (np.zeros((2, 84), np.uint8), T.Q2_K)})
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.weight.*Q2_K"):
        read_state_dict(tmp_path / "q2.gguf")


@pytest.mark.parametrize("qtype,rms", [(T.Q8_0, 0.01), (T.Q6_K, 0.03), (T.Q5_K, 0.05), (T.Q4_K, 0.1)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_quantizers_round_trip(qtype, rms):
    """Our K-quant writers (and gguf's Q8_0) give bytes that gguf's numpy reads back close to the input."""
    x = np.random.default_rng(2).standard_normal((4, 512)).astype(np.float32)
    back = gguf.quants.dequantize(quantize_array(x, qtype), qtype)
    err = float(np.sqrt(((back - x) ** 2).mean()))
    assert 0 < err < rms


def test_quantized_tensor_moves_and_keeps_its_shape():
    raw = torch.from_numpy(_random_blocks(T.Q8_0, 6, 2))
    q = QuantizedTensor(raw, T.Q8_0, (6, 64))
    p = torch.nn.Parameter(q, requires_grad=False)
    moved = p.to("cpu").detach()
    assert isinstance(moved, QuantizedTensor) and moved.shape == (6, 64) and moved.qtype == T.Q8_0
    assert p.numel() * p.element_size() == raw.numel()  # memory accounting counts the bytes held
    assert not isinstance(q.as_subclass(torch.Tensor) + 1, QuantizedTensor)


CFG = DiTConfig(depth=2, width=256, cross_heads=2, caption_channels=64)  # rows of 256: K-quants apply


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Sana folder whose DiT (width 256, bf16) is also written as GGUF Q8_0 / Q4_K / BF16 by our command,
    and in the diffusers layout as Q8_0."""
    root = tmp_path_factory.mktemp("gguf")
    folder = write_tiny_pipeline(root / "sana", seed=31)
    dit = randomize_(SanaDiT(CFG), 32).to(torch.bfloat16)
    save_dit(dit, folder / "transformer")
    out = {"folder": folder}
    for t in ("Q8_0", "Q4_K", "BF16"):
        out[t] = root / f"dit_{t}.gguf"
        assert quantize([str(folder / "transformer"), str(out[t]), "--type", t]) == 0
    return out


def test_gguf_dit_loads_quantized_with_its_config(files):
    ref = load_dit(files["folder"])
    q8 = load_dit(files["Q8_0"], dtype=torch.float32)
    assert q8.cfg == ref.cfg
    qkv = q8.blocks[0].attn.qkv
    assert isinstance(qkv, GGUFOps.Linear) and isinstance(qkv.weight, QuantizedTensor) and qkv.weight.qtype == T.Q8_0
    assert q8.blocks[0].scale_shift_table.dtype == torch.float32 and not isinstance(q8.t_block[1].weight,
                                                                                      QuantizedTensor)
    q4 = load_dit(files["Q4_K"], dtype=torch.float32)
    assert q4.blocks[1].mlp.inverted_conv.conv.weight.qtype == T.Q4_K
    assert q4.blocks[1].mlp.point_conv.conv.weight.qtype == T.Q5_0  # rows of 640: llama.cpp's fallback for Q4_K
    bf16 = load_dit(files["BF16"])
    assert all(torch.equal(a, b) for a, b in zip(bf16.state_dict().values(), ref.state_dict().values()))


def test_diffusers_names_inside_a_gguf(files, tmp_path):
    """A GGUF holding diffusers' key names (split q/k/v, quantized) loads: the fused weights are whole blocks."""
    ref = load_dit(files["folder"], dtype=torch.float32)
    theirs = {}
    for name, (t, qtype) in {"patch_embed.proj.weight": (ref.x_embedder.proj.weight, None)}.items():
        theirs[name] = (t.numpy(), qtype)
    from sana_core.checkpoints.dit import nvlabs_to_diffusers, pointwise_kernels
    sd = nvlabs_to_diffusers(pointwise_kernels(dict(ref.state_dict()), 4))
    for name, t in sd.items():
        quantizable = t.ndim == 2 and ".attn" in name and t.shape[-1] % 32 == 0
        theirs[name] = ((quantize_array(t.numpy(), T.Q8_0), T.Q8_0) if quantizable else (t.numpy(), None))
    _write(tmp_path / "diffusers_names.gguf", theirs)
    got = load_dit(tmp_path / "diffusers_names.gguf", dtype=torch.float32)
    assert got.blocks[0].attn.qkv.weight.qtype == T.Q8_0
    want = dequantize(load_dit(files["Q8_0"], dtype=torch.float32).blocks[0].attn.qkv.weight)
    assert torch.equal(dequantize(got.blocks[0].attn.qkv.weight), want)


def test_q8_image_is_within_2_of_255_of_the_bf16_image(files):
    """The same generation (fp32 compute) with the bf16 DiT and with its Q8_0 / Q4_K GGUFs: mean distance of the
    images in 1/255 units (printed; measured 0.54 for Q8_0 and 6.4 for Q4_K)."""
    from sana_core.pipeline import SanaPipeline

    pipe = SanaPipeline.from_pretrained(files["folder"], torch_dtype=torch.float32, device="cpu")
    cond, uncond = pipe.encode_prompt(["a red fox in the snow"], [""])  # once for the three DiTs
    images = {}
    for t in ("BF16", "Q8_0", "Q4_K"):
        pipe.dit = load_dit(files[t], dtype=torch.float32)
        images[t] = pipe(prompt_embeds=cond.embeds, prompt_attention_mask=cond.mask,
                         negative_prompt_embeds=uncond.embeds, negative_prompt_attention_mask=uncond.mask,
                         height=96, width=96, num_inference_steps=3, seed=3, output_type="pt", progress=False)
    distances = {t: float((images[t] - images["BF16"]).abs().mean() * 255) for t in ("Q8_0", "Q4_K")}
    print(f"\nmean |image - bf16 image| (1/255 units): {distances}")
    assert 0 < distances["Q8_0"] < 2 and distances["Q8_0"] < distances["Q4_K"]


def test_lora_on_a_gguf_model_equals_lora_on_the_dequantized_model(files, tmp_path):
    from safetensors.torch import save_file

    from sana_core.lora import merge_lora

    g = torch.Generator().manual_seed(4)
    save_file({"transformer.transformer_blocks.0.attn1.to_k.lora_A.weight": torch.randn(4, 256, generator=g),
               "transformer.transformer_blocks.0.attn1.to_k.lora_B.weight": torch.randn(256, 4, generator=g),
               "blocks.1.mlp.point_conv.conv.lora_down.weight": torch.randn(2, 640, generator=g),
               "blocks.1.mlp.point_conv.conv.lora_up.weight": torch.randn(256, 2, generator=g)},
              str(tmp_path / "lora.safetensors"))
    quantized = load_dit(files["Q4_K"], dtype=torch.float32)
    plain = load_dit(files["Q4_K"], dtype=torch.float32)
    for name, p in list(plain.named_parameters()):  # the dequantized model: ordinary float32 weights
        module, _, attr = name.rpartition(".")
        setattr(plain.get_submodule(module), attr, torch.nn.Parameter(dequantize(p), requires_grad=False))
    assert merge_lora(quantized, tmp_path / "lora.safetensors", 0.7) == merge_lora(plain, tmp_path / "lora.safetensors", 0.7) == 2
    assert isinstance(quantized.blocks[0].attn.qkv.weight, QuantizedTensor)
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.point_conv.conv.weight", "blocks.0.attn.proj.weight"):
        assert torch.equal(dequantize(quantized.get_parameter(name)), plain.get_parameter(name)), name
    x, t, ctx = torch.randn(1, 32, 4, 4), torch.tensor([400.0]), torch.randn(1, 6, 64)
    torch.testing.assert_close(quantized(x, t, ctx), plain(x, t, ctx), rtol=1e-5, atol=1e-5)


def _llama_cpp_gemma(root, path, qtype=T.Q8_0) -> None:
    """A Gemma-2 GGUF as llama.cpp's convert_hf_to_gguf.py writes one (names, norms as 1 + w, hyper-parameters,
    sentencepiece pieces/scores/types), made here with the gguf writer from a Sana folder's text_encoder/ and
    tokenizer/; matrices in `qtype`."""
    import json

    import sentencepiece
    from safetensors.torch import load_file

    config = json.loads((root / "text_encoder" / "config.json").read_text())
    spm = sentencepiece.SentencePieceProcessor(model_file=str(root / "tokenizer" / "tokenizer.model"))
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    writer = gguf.GGUFWriter(str(path), "gemma2")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_sliding_window(config["sliding_window"])
    writer.add_tokenizer_model("llama")
    n = spm.get_piece_size()
    writer.add_token_list([spm.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([spm.get_score(i) for i in range(n)])
    writer.add_token_types([2 if spm.is_unknown(i) else 3 if spm.is_control(i) else 6 if spm.is_byte(i)
                            else 4 if spm.id_to_piece(i) == "<mask>" else 1 for i in range(n)])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)
    for name, t in load_file(root / "text_encoder" / "model.safetensors").items():
        name = name.removeprefix("model.")
        if name.endswith("norm.weight"):
            writer.add_tensor(("output_norm" if name == "norm.weight" else
                               "blk.{}.{}".format(*name.split(".")[1:2], names[name.split(".", 2)[2][:-7]]))
                              + ".weight", (t.float() + 1).numpy())
            continue
        stem = "token_embd" if name == "embed_tokens.weight" else \
            f"blk.{name.split('.')[1]}.{names[name.split('.', 2)[2][:-7]]}"
        writer.add_tensor(stem + ".weight", quantize_array(t.float().numpy(), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gemma(files):
    """(the Sana folder, whose text_encoder/ + tokenizer/ is the original Gemma, its llama.cpp-layout Q8_0 GGUF)."""
    path = files["folder"].parent / "gemma-2-tiny-Q8_0.gguf"
    _llama_cpp_gemma(files["folder"], path)
    return files["folder"], path


def test_llama_cpp_gemma_gguf_gives_the_embeddings_of_the_original(gemma, tmp_path):
    """In F32 the llama.cpp file gives the original's embeddings exactly (names, norms, config, tokenizer); in
    Q8_0 (matrices and embedding table quantized) within 10% relative on this tiny random Gemma (measured 4%)."""
    from sana_core.checkpoints.gemma import load_text_encoder

    hf, path = gemma
    prompts = ["a red fox", "an old man"]
    want, want_mask = load_text_encoder(hf, dtype=torch.float32).encode(prompts)
    _llama_cpp_gemma(hf, tmp_path / "f32.gguf", T.F32)
    got, mask = load_text_encoder(tmp_path / "f32.gguf", dtype=torch.float32).encode(prompts)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    te = load_text_encoder(path, dtype=torch.float32)
    assert isinstance(te.model.layers[0].self_attn.q_proj.weight, QuantizedTensor)
    assert isinstance(te.model.embed_tokens.weight, QuantizedTensor)
    got, mask = te.encode(prompts)
    assert torch.equal(mask, want_mask)
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 0.1, rel


def test_quantize_command_writes_gemma_that_reads_back(gemma, tmp_path):
    """Our command on the Sana folder (--model gemma: its text encoder): a llama.cpp-layout file whose tensors
    and tokenizer equal the other's."""
    from sana_core.checkpoints.gemma import load_text_encoder

    hf, path = gemma
    assert quantize([str(hf), str(tmp_path / "ours.gguf"), "--type", "Q8_0", "--model", "gemma"]) == 0
    assert gguf.GGUFReader(str(tmp_path / "ours.gguf")).fields["general.architecture"].contents() == "gemma2"
    ours, theirs = load_text_encoder(tmp_path / "ours.gguf"), load_text_encoder(path)
    assert ours.tokenizer("a red fox, 35mm").input_ids == theirs.tokenizer("a red fox, 35mm").input_ids
    for (name, a), b in zip(ours.model.state_dict().items(), theirs.model.state_dict().values()):
        assert torch.equal(dequantize(a), dequantize(b)), name


def test_api_and_cli_generate_from_gguf_dit_and_gguf_gemma(files, gemma, tmp_path, capsys):
    """The whole pipeline from a Q8_0 DiT + a Q8_0 llama.cpp Gemma (+ the folder's DC-AE), in the API and the CLI:
    the same image, close to the unquantized one."""
    from PIL import Image

    from sana_core.cli import main as cli
    from sana_core.pipeline import SanaPipeline

    folder = files["folder"]
    quantize([str(folder), str(tmp_path / "te.gguf"), "--type", "Q8_0", "--model", "gemma"])
    kw = dict(height=64, width=96, num_inference_steps=2, seed=7, progress=False)
    pipe = SanaPipeline.from_pretrained(folder, dit=files["Q8_0"], text_encoder=tmp_path / "te.gguf",
                                        dtype=torch.float32, device="cpu")
    assert isinstance(pipe.text_encoder.model.embed_tokens.weight, QuantizedTensor)
    image = pipe("a red fox", **kw)[0]
    assert cli(["--prompt", "a red fox", "--model", str(folder), "--dit", str(files["Q8_0"]), "--text_encoder",
                str(tmp_path / "te.gguf"), "--dtype", "fp32", "--height", "64", "--width", "96", "--steps", "2",
                "--seed", "7", "--output_dir", str(tmp_path / "out")]) == 0
    (png,) = (tmp_path / "out").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(image))
    plain = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")("a red fox", **kw)[0]
    assert np.abs(np.asarray(image, np.int16) - np.asarray(plain, np.int16)).mean() < 8
