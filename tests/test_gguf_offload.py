"""Block offload (`sana_core.offload`) on the CPU with a recording transfer backend: the order of copies, waits and
releases, at most `ahead + 1` blocks resident, outputs equal to no offload (also a GGUF DiT, and the pipeline with
`offload="blocks"` and the CLI's --offload_blocks)."""
import pytest
import torch

from sana_core.dit import DiTConfig, SanaDiT
from sana_core.offload import BlockOffload, Transfers, offload_blocks, remove_offload
from sana_core.tiny import randomize_, write_tiny_pipeline


class Recording(Transfers):
    """Copies are clones (new storage, like device copies); every call is logged; events are checked."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.log = []

    def copy(self, tensors, block):
        self.log.append(("copy", block))
        return [t.clone() for t in tensors], ("event", block)

    def wait(self, event, block):
        assert event == ("event", block)
        self.log.append(("wait", block))

    def computed(self, block):
        self.log.append(("computed", block))


def _dit(depth=3):
    return randomize_(SanaDiT(DiTConfig(depth=depth, width=64, cross_heads=2, caption_channels=32)), 3).eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 32, 4, 4, generator=g), torch.tensor([300.0, 700.0]), torch.randn(2, 5, 32, generator=g)


def test_order_overlap_and_results_equal_to_no_offload():
    dit = _dit()
    x, t, ctx = _inputs()
    with torch.no_grad():
        want = dit(x, t, ctx)
        host = [p.data_ptr() for p in dit.blocks.parameters()]
        rec = Recording()
        off = offload_blocks(dit, "cpu", transfers=rec)
        seen = []
        for i, block in enumerate(dit.blocks):  # after the offload's own pre-hook: what is resident now
            block.register_forward_pre_hook(lambda m, a, i=i: seen.append(
                (i, off.resident, all(p.data_ptr() not in host for p in m.parameters()))))
        got = dit(x, t, ctx)
    assert torch.equal(got, want)
    # the text keys/values (outside the blocks' forward) stream the blocks too, then the forward does
    steady = [("wait", 0), ("copy", 1), ("computed", 0), ("wait", 1), ("copy", 2), ("computed", 1),
              ("wait", 2), ("copy", 0), ("computed", 2)]
    assert rec.log == [("copy", 0)] + steady + steady
    assert seen == [(0, [0, 1], True), (1, [1, 2], True), (2, [0, 2], True)]  # ahead + 1 = 2 at once
    assert off.resident == [0]  # fetched for the next call
    with torch.no_grad():
        assert torch.equal(dit(x, t, ctx), want)
    assert rec.log[19:] == steady + steady  # the next call finds block 0 already there
    remove_offload(dit, off)
    assert off.resident == [] and all(p.data_ptr() in {q.data_ptr() for h in off.host for q in h}
                                      for p in dit.blocks.parameters())
    with torch.no_grad():
        assert torch.equal(dit(x, t, ctx), want)


def test_two_ahead_and_a_window_holding_every_block():
    blocks = [torch.nn.Linear(4, 4) for _ in range(4)]
    rec = Recording()
    off = BlockOffload(blocks, "cpu", rec, ahead=2).attach()
    x = torch.randn(1, 4)
    for b in blocks:
        x = b(x)
    assert rec.log[:6] == [("copy", 0), ("wait", 0), ("copy", 1), ("copy", 2), ("computed", 0), ("wait", 1)]
    assert off.resident == [0, 1]
    small = [torch.nn.Linear(4, 4) for _ in range(2)]
    rec2 = Recording()
    off2 = BlockOffload(small, "cpu", rec2, ahead=1).attach()
    for _ in range(2):
        for b in small:
            b(x)
    assert off2.resident == [0, 1] and [e for e in rec2.log if e[0] == "copy"] == [("copy", 0), ("copy", 1)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("offload"), seed=41, depth=3)


def test_pipeline_and_cli_with_block_offload_equal_no_offload(folder, tmp_path):
    import numpy as np
    from PIL import Image

    from sana_core.cli import main
    from sana_core.pipeline import SanaPipeline

    kw = dict(height=64, width=64, num_inference_steps=2, seed=1, output_type="pt", progress=False)
    want = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")("a red fox", **kw)
    pipe = SanaPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu", offload="blocks")
    assert pipe.blocks is not None and len(pipe.blocks.params) == 3
    assert torch.equal(pipe("a red fox", **kw), want)
    with pytest.raises(ValueError, match="offload='layers'"):
        SanaPipeline(pipe.dit, pipe.vae, pipe.text_encoder, device="cpu", offload="layers")
    assert main(["--prompt", "a red fox", "--model", str(folder), "--dtype", "fp32", "--height", "64", "--width",
                 "64", "--steps", "2", "--seed", "1", "--offload_blocks", "--output_dir", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)),
                          (want[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def test_gguf_dit_with_block_offload_equals_no_offload(tmp_path):
    """Quantized weights stream as their raw blocks and keep their type, shape and LoRA patches."""
    from sana_core.checkpoints.dit import load_dit, save_dit
    from sana_core.quantize import main as quantize
    from sana_core.quantized import QuantizedTensor

    save_dit(_dit(), tmp_path / "dit.safetensors", layout="nvlabs")
    quantize([str(tmp_path / "dit.safetensors"), str(tmp_path / "dit.gguf"), "--type", "Q8_0"])
    dit = load_dit(tmp_path / "dit.gguf", dtype=torch.float32)
    x, t, ctx = _inputs()
    with torch.no_grad():
        want = dit(x, t, ctx)
        rec = Recording()
        offload_blocks(dit, "cpu", transfers=rec)
        assert torch.equal(dit(x, t, ctx), want)
    qkv = dit.blocks[1].attn.qkv.weight
    assert isinstance(qkv, QuantizedTensor) and qkv.shape == (192, 64) and ("copy", 2) in rec.log
