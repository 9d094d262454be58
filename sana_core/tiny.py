"""Tiny random Sana models in the real file layouts, for tests and for trying the pipeline without downloads.

``python -m sana_core.tiny OUT_DIR`` writes a complete diffusers-style Sana folder (transformer, vae,
text_encoder, tokenizer, scheduler, model_index.json) with random weights: the images it makes are noise,
but every code path of loading and generation runs.
"""
from __future__ import annotations

from pathlib import Path

import torch


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with non-trivial random values (in place) and return the module.

    Matrices/conv kernels ~ N(0, 1/fan_in), 1-D norm weights 1 + N(0, 0.1^2), other 1-D parameters and
    tables ~ N(0, 0.1^2): far from default inits (zeros/ones), so a wrongly mapped key changes the output.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2 and "table" not in name:
                r = r / p[0].numel() ** 0.5
            elif "norm" in name and name.endswith("weight"):
                r = 1 + 0.1 * r
            else:
                r = 0.1 * r
            p.copy_(r.to(p.dtype))
    return module


def write_tiny_gemma(folder: str | Path, seed: int = 0, single_file: str | Path | None = None) -> Path:
    """Tiny random Gemma-2 in the HF folder layout of ``google/gemma-2-2b-it``; returns the folder.

    Writes config.json, model.safetensors (``model.*`` keys; lm_head is tied and absent), tokenizer.model,
    tokenizer.json and tokenizer_config.json. With ``single_file``, also ComfyUI's single-file layout: the same
    keys plus the sentencepiece model as a uint8 ``spiece_model`` tensor. Model: hidden 64, 2 layers, 4 heads /
    2 KV heads of Gemma-2's head_dim 256 (which the single-file loader assumes), intermediate 128, fp32.
    Tokenizer: a real Gemma-style sentencepiece BPE (pad 0, eos 1, bos 2, unk 3, <mask> 4, byte fallback, raw
    whitespace, split digits) trained on the CHI and a few prompts; training it needs ``sentencepiece``.
    """
    import io
    import json

    import sentencepiece
    from safetensors.torch import save_file
    from transformers import Gemma2Config, Gemma2Model

    from .checkpoints.gemma import GEMMA2_2B, tokenizer_from_spm
    from .text_encoder import COMPLEX_HUMAN_INSTRUCTION

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prompts = ["a cat sleeping on a sunny windowsill", "An astronaut riding a horse on the moon, 35mm photo, 4k",
               "a busy city street at night, neon lights and rain", "portrait of an old man with a white beard"]
    spm = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([*COMPLEX_HUMAN_INSTRUCTION, *prompts]), model_writer=spm, model_type="bpe",
        vocab_size=600, hard_vocab_limit=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"], byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    spm = spm.getvalue()
    (folder / "tokenizer.model").write_bytes(spm)
    tokenizer = tokenizer_from_spm(spm, folder / "tokenizer.model")
    tokenizer.save_pretrained(folder)
    tokenizer_config = folder / "tokenizer_config.json"  # as google/gemma-2-2b-it's, for AutoTokenizer
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()),
                                            "tokenizer_class": "GemmaTokenizer", "add_bos_token": True,
                                            "add_eos_token": False}, indent=2))

    config = Gemma2Config(**{**GEMMA2_2B, "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
                          architectures=["Gemma2ForCausalLM"])
    config.save_pretrained(folder)
    sd = {f"model.{k}": v.contiguous() for k, v in randomize_(Gemma2Model(config), seed).state_dict().items()}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    if single_file is not None:
        spiece = torch.frombuffer(bytearray(spm), dtype=torch.uint8)
        save_file({**sd, "spiece_model": spiece}, single_file, metadata={"format": "pt"})
    return folder


def tiny_dcae_config(variant: str = "dc-ae-f32c32-sana-1.0"):
    """`variant`'s DC-AE structure (f32c32, same depths, block types and resamplers) at widths 8..64, head dim 8."""
    from dataclasses import replace

    from .dcae import VARIANTS

    widths = (8, 16, 32, 32, 64, 64)
    return replace(VARIANTS[variant], encoder_widths=widths, decoder_widths=widths, attention_head_dim=8)


def write_tiny_dcae(folder: str | Path, seed: int = 0, layout: str = "diffusers",
                    variant: str = "dc-ae-f32c32-sana-1.0") -> Path:
    """Write a tiny random DC-AE (see `tiny_dcae_config`) in a real layout and return the folder:
    "diffusers" = config.json + diffusion_pytorch_model.safetensors (as in a pipeline's vae/), "efficientvit" =
    model.safetensors with mit-han-lab keys. Same seed, same weights in either layout."""
    import json

    from safetensors.torch import save_file

    from .checkpoints.dcae import diffusers_config, to_efficientvit
    from .dcae import DCAE

    if layout not in ("diffusers", "efficientvit"):
        raise ValueError(f"layout must be 'diffusers' or 'efficientvit', got {layout!r}")
    cfg = tiny_dcae_config(variant)
    sd = randomize_(DCAE(cfg), seed).state_dict()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        (folder / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2))
        save_file(sd, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    else:
        save_file(to_efficientvit(sd, cfg), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def tiny_dit_config(sprint: bool = False, caption_channels: int = 64, depth: int = 2):
    """A width-64 DiT of `depth` blocks (2 self- and 2 cross-attention heads); Sprint adds q/k norm and the
    guidance embedder. A ControlNet needs depth 8 (its 7 residuals join blocks 0..6 or 1..7)."""
    from .dit import DiTConfig

    return DiTConfig(depth=depth, width=64, cross_heads=2, caption_channels=caption_channels,
                     qk_norm=sprint, guidance_embed=sprint)


def write_tiny_pipeline(folder: str | Path, seed: int = 0, sprint: bool = False, depth: int = 2) -> Path:
    """A complete tiny Sana diffusers folder, as `Efficient-Large-Model/Sana_*_diffusers` lays it out:
    model_index.json, transformer/, vae/, text_encoder/ (Gemma2Model), tokenizer/, scheduler/.
    `sprint=True` writes a Sana-Sprint folder (guidance embedder, SCM scheduler). Returns the folder."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from .checkpoints.dit import save_dit
    from .dit import SanaDiT
    from .spec import SANA, SPRINT

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    te, tok = root / "text_encoder", root / "tokenizer"
    write_tiny_gemma(te, seed)
    tok.mkdir(exist_ok=True)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (te / name).exists():
            shutil.move(te / name, tok / name)
    sd = {k.removeprefix("model."): v for k, v in load_file(te / "model.safetensors").items()}
    save_file(sd, te / "model.safetensors", metadata={"format": "pt"})  # Gemma2Model keys, as diffusers saves
    config = json.loads((te / "config.json").read_text())
    (te / "config.json").write_text(json.dumps({**config, "architectures": ["Gemma2Model"]}, indent=2))

    dit = randomize_(SanaDiT(tiny_dit_config(sprint, config["hidden_size"], depth)), seed + 1)
    save_dit(dit, root / "transformer")
    write_tiny_dcae(root / "vae", seed + 2)
    if sprint:
        scheduler = {"_class_name": "SCMScheduler", "num_train_timesteps": 1000, "prediction_type": "trigflow",
                     "max_timesteps": SPRINT.max_timesteps, "intermediate_timesteps": SPRINT.intermediate_timesteps,
                     "sigma_data": 0.5}
    else:
        scheduler = {"_class_name": "DPMSolverMultistepScheduler", "flow_shift": SANA.shift, "use_flow_sigmas": True,
                     "prediction_type": "flow_prediction", "solver_order": 2, "final_sigmas_type": "zero"}
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "SanaSprintPipeline" if sprint else "SanaPipeline",
             "scheduler": ["diffusers", scheduler["_class_name"]], "text_encoder": ["transformers", "Gemma2Model"],
             "tokenizer": ["transformers", "GemmaTokenizerFast"],
             "transformer": ["diffusers", "SanaTransformer2DModel"], "vae": ["diffusers", "AutoencoderDC"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def write_tiny_controlnet(path: str | Path, dit: str | Path, seed: int = 0) -> Path:
    """A tiny NVlabs ControlNet release for the DiT at `dit` (a folder or file our loader reads, 8+ blocks): one
    `.pth` `{"state_dict": ...}` holding the base model and a random 7-block branch (`controlnet.N.*`), as
    `Sana_600M_1024px_ControlNet_HED.pth` is laid out. Returns the file."""
    from .checkpoints.dit import load_dit, pointwise_kernels
    from .controlnet import SanaControlNet

    base = load_dit(dit, dtype=torch.float32)
    branch = randomize_(SanaControlNet(base.cfg), seed)
    sd = {**base.state_dict(), **branch.state_dict()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": pointwise_kernels({k: v.contiguous() for k, v in sd.items()}, 4)}, path)
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sana_core.tiny", description=__doc__)
    parser.add_argument("folder", help="where to write the tiny Sana diffusers folder")
    parser.add_argument("--sprint", action="store_true", help="a Sana-Sprint folder instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_tiny_pipeline(args.folder, args.seed, args.sprint))
