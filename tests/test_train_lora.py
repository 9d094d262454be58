"""Trained LoRA adapters: their forward, their file in diffusers' names, and that file in diffusers' pipeline,
our pipeline and our merge (fp32, CPU)."""
import pytest
import torch
from safetensors.torch import load_file

from sana_core.dit import SanaDiT
from sana_core.lora import merge_lora
from sana_core.pipeline import SanaPipeline
from sana_core.tiny import randomize_, tiny_dit_config, write_tiny_pipeline
from sana_core.train.lora import LoRALinear, add_lora, save_lora

TOL = dict(rtol=1e-4, atol=5e-5)  # as tests/test_pipeline.py: whole generations in fp32


def _train_like(adapters, seed=0):
    """Give the up matrices values (they start at zero), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters:
            for up in a.ups:
                up.copy_(torch.randn(up.shape, generator=g) * 0.3)


def _inputs(width=4):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 32, 4, width, generator=g), torch.randn(2, 10, 64, generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0
    return x, torch.tensor([700.0, 120.0]), ctx, mask


@pytest.mark.parametrize("targets,layers", [(("to_q", "to_k", "to_v", "to_out.0"), 10), (("attn1.to_k",), 2),
                                            (("attn2.to_v", "transformer_blocks.1.attn1.to_q"), 3)])
def test_adapters_equal_their_merged_file(tmp_path, targets, layers):
    """The adapted forward equals the base DiT with the saved file merged by `sana_core.lora.merge_lora`, for
    fused q/k/v parts targeted alone or together, with alpha != rank."""
    base = randomize_(SanaDiT(tiny_dit_config()), seed=2)
    trained = randomize_(SanaDiT(tiny_dit_config()), seed=2)
    adapters = add_lora(trained, rank=3, alpha=6.0, targets=targets, seed=5)
    assert len(adapters) == layers and all(isinstance(a, LoRALinear) for a in adapters)
    assert all(not p.requires_grad for n, p in trained.named_parameters() if ".base." in n)
    _train_like(adapters)
    path = save_lora(trained, tmp_path)
    assert path.name == "pytorch_lora_weights.safetensors"
    keys = load_file(path)
    assert all(k.startswith("transformer.transformer_blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in keys)
    n = merge_lora(base, path)
    with torch.no_grad():
        torch.testing.assert_close(trained(*_inputs()), base(*_inputs()), **TOL)
    assert n == len(keys) // 2


def test_untrained_adapters_change_nothing():
    plain = randomize_(SanaDiT(tiny_dit_config()), seed=2)
    adapted = randomize_(SanaDiT(tiny_dit_config()), seed=2)
    add_lora(adapted, rank=4)
    with torch.no_grad():
        assert torch.equal(plain(*_inputs()), adapted(*_inputs()))


def test_bad_targets_name_the_flag():
    dit = SanaDiT(tiny_dit_config())
    with pytest.raises(ValueError, match="--lora_targets.*to_qq"):
        add_lora(dit, 4, targets=("to_qq",))
    with pytest.raises(ValueError, match="--lora_targets.*conv_inverted.*not a Linear"):
        add_lora(SanaDiT(tiny_dit_config()), 4, targets=("ff.conv_inverted",))
    with pytest.raises(ValueError, match="--lora_rank"):
        add_lora(SanaDiT(tiny_dit_config()), 0)


def test_saved_lora_same_image_in_diffusers_and_ours(tmp_path):
    """The file from `save_lora` in diffusers' SanaPipeline.load_lora_weights, in our pipeline's load_lora (what
    the CLI's --lora does) and merged by ComfyUI-style keys gives one image (tolerance of the pipeline tests)."""
    from diffusers import SanaPipeline as Ref

    folder = write_tiny_pipeline(tmp_path / "sana", seed=11)
    ours = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    trained = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu").dit
    _train_like(add_lora(trained, rank=4, alpha=8.0, seed=3), seed=9)
    path = save_lora(trained, tmp_path / "lora")
    plain = ours(["a cat sleeping"], seed=5, num_inference_steps=6, height=64, width=96, output_type="pt",
                 progress=False)
    ours.load_lora(path)
    got = ours(["a cat sleeping"], seed=5, num_inference_steps=6, height=64, width=96, output_type="pt",
               progress=False)
    ref = Ref.from_pretrained(folder, torch_dtype=torch.float32)
    ref.load_lora_weights(str(path))
    want = ref(prompt=["a cat sleeping"], negative_prompt="", num_inference_steps=6, height=64, width=96,
               guidance_scale=4.5, use_resolution_binning=False, generator=torch.Generator().manual_seed(5),
               output_type="pt").images
    torch.testing.assert_close(got, want, **TOL)
    assert (got - plain).abs().max() > 1e-2  # the LoRA really changed the image
