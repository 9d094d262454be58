"""TAESANA: madebyollin's tiny autoencoder for Sana's DC-AE (f32c32), the F32 variant of the taesd repository's
`taesd.py` (`F32Encoder` / `F32Decoder`), for full-size live previews and approximate ("draft") encodes/decodes.

The released files are `taesana_encoder.pth` and `taesana_decoder.pth` (github.com/madebyollin/taesd), each the
state dict of one `nn.Sequential` (keys "0.weight", "4.conv.0.weight", ...); the layer indices below are
those of taesd.py, so the files load strictly. TAESANA's latents are the DiT's (scaled) latents: DC-AE latents
times its scaling factor 0.41407 (taesd's "scale factor 1" convention; the released encoder gives latents of
standard deviation about 1 on photographs, the scaled DC-AE's, not the raw 2.4).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints.files import CheckpointError, PathLike, describe_keys, load_strict, read_state_dict

log = logging.getLogger(__name__)

LATENT_CHANNELS = 32
FACTOR = 32                                  # pixels per latent pixel, each way
DECODER_WIDTHS = (256, 128, 64, 64, 64)      # decoder channels at 1/32, 1/16, 1/8, 1/4, 1/2 of the image size
PARTS = ("encoder", "decoder")
#: Prefixes a file holding both parts may use: taesd.py's TAESD module, ComfyUI's TAESD module.
PART_PREFIXES = {"encoder": ("encoder.", "taesd_encoder."), "decoder": ("decoder.", "taesd_decoder.")}
#: The first convolution of each part in the released layout, and its weight's shape.
FIRST_CONV = {"encoder": ("0.weight", (32, 3, 3, 3)), "decoder": ("1.weight", (256, LATENT_CHANNELS, 3, 3))}


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3): tanh(x / 3) * 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """relu(conv3(relu(conv2(relu(conv1(x))))) + x): taesd.py's Block with equal in/out channels (its skip is the
    identity; TAESANA has no other kind)."""

    def __init__(self, ch: int, ops: Any):
        super().__init__()
        self.conv = nn.Sequential(conv(ch, ch, ops), nn.ReLU(), conv(ch, ch, ops), nn.ReLU(), conv(ch, ch, ops))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + x)


def conv(n_in: int, n_out: int, ops: Any, **kwargs: Any) -> nn.Module:
    return ops.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


def tiny_encoder(ops: Any) -> nn.Sequential:
    """taesd.py's F32Encoder: images (B, 3, H, W) in 0..1 -> latents (B, 32, H/32, W/32). Two stride-2 convs to
    1/4, then three times a stride-2 conv and three Blocks, then a conv to 32 channels."""
    layers = [conv(3, 32, ops, stride=2), nn.ReLU(), conv(32, 64, ops, stride=2), nn.ReLU(), Block(64, ops)]
    for _ in range(3):
        layers += [conv(64, 64, ops, stride=2, bias=False), Block(64, ops), Block(64, ops), Block(64, ops)]
    return nn.Sequential(*layers, conv(64, LATENT_CHANNELS, ops))


def tiny_decoder(ops: Any) -> nn.Sequential:
    """taesd.py's F32Decoder: latents (B, 32, h, w) -> images (B, 3, 32h, 32w), about 0..1. Clamp, a conv to 256
    channels, then five times three Blocks, a 2x nearest upsample and a conv to the next width; one Block, RGB."""
    layers = [Clamp(), conv(LATENT_CHANNELS, DECODER_WIDTHS[0], ops), nn.ReLU()]
    for ch, out in zip(DECODER_WIDTHS, DECODER_WIDTHS[1:] + DECODER_WIDTHS[-1:]):
        layers += [Block(ch, ops), Block(ch, ops), Block(ch, ops), nn.Upsample(scale_factor=2),
                   conv(ch, out, ops, bias=False)]
    return nn.Sequential(*layers, Block(DECODER_WIDTHS[-1], ops), conv(DECODER_WIDTHS[-1], 3, ops))


class TAESANA(nn.Module):
    """TAESANA's encoder and/or decoder (a part left out is None and its method raises). Pixels are in [-1, 1]
    as for the DC-AE; latents are the DiT's scaled latents. Layers are built with `ops` (`ops.Conv2d`)."""

    def __init__(self, encoder: bool = True, decoder: bool = True, ops: Any = None):
        super().__init__()
        ops = ops or nn
        self.encoder = tiny_encoder(ops) if encoder else None
        self.decoder = tiny_decoder(ops) if decoder else None
        self.source = ""  # the file(s) loaded, for messages

    def _part(self, name: str) -> nn.Sequential:
        part = getattr(self, name)
        if part is None:
            raise ValueError(f"TAESANA ({self.source or 'not loaded'}) has no {name}: load taesana_{name}.pth too")
        return part

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1], H and W multiples of 32 -> scaled latents (B, 32, H/32, W/32)."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % FACTOR or images.shape[-2] % FACTOR:
            raise ValueError(f"TAESANA encode: expected images (B, 3, H, W) with H and W multiples of {FACTOR}, got "
                             f"{tuple(images.shape)}")
        return self._part("encoder")(images * 0.5 + 0.5)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 32, h, w) -> images (B, 3, 32h, 32w), about [-1, 1] (not clamped)."""
        if latents.ndim != 4 or latents.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"TAESANA decode: expected Sana latents (B, {LATENT_CHANNELS}, h, w), got "
                             f"{tuple(latents.shape)}")
        return self._part("decoder")(latents) * 2 - 1


def part_of(sd: dict[str, torch.Tensor], part: str, source: PathLike | str) -> dict[str, torch.Tensor]:
    """The keys of `part` ("encoder"/"decoder") in a TAESANA file, in the released layout (bare `nn.Sequential`
    keys). A file with both parts under "encoder."/"decoder." (or "taesd_encoder."/"taesd_decoder.") gives its
    part; anything else is a CheckpointError naming the file and what it holds."""
    for prefix in PART_PREFIXES[part]:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    firsts = {name: tuple(sd[key].shape) for name, (key, _) in FIRST_CONV.items() if key in sd}
    key, shape = FIRST_CONV[part]
    if firsts.get(part) == shape:
        return sd
    other = next((name for name, (k, s) in FIRST_CONV.items() if firsts.get(name) == s), None)
    if other is not None:
        raise CheckpointError(f"{source}: this is a TAESANA {other}, expected the {part} "
                              f"(taesana_{part}.pth)")
    if part in firsts:
        raise CheckpointError(f"{source}: {key} has shape {firsts[part]}, expected {shape}: a tiny autoencoder "
                              f"for another model (TAESD/TAESDXL/TAESD3/TAEF1 work on 4 or 16 latent channels at "
                              f"1/8), not TAESANA (32 channels at 1/32, taesana_{part}.pth)")
    raise CheckpointError(f"{source}: not a TAESANA {part} ({describe_keys(sd)}); expected the keys of "
                          f"taesana_{part}.pth from github.com/madebyollin/taesd")


def load_taesana(encoder: PathLike | None = None, decoder: PathLike | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", ops: Any = None) -> TAESANA:
    """TAESANA from its released files (`.pth`, read with weights_only, or `.safetensors`): the encoder, the
    decoder, or both (one file may hold both, see `part_of`). Strict: every key used, every shape equal."""
    paths = {"encoder": encoder, "decoder": decoder}
    if not any(paths.values()):
        raise ValueError("load_taesana: give the encoder and/or decoder file")
    sd: dict[str, torch.Tensor] = {}
    read: dict[PathLike, dict[str, torch.Tensor]] = {}  # a file holding both parts is read once
    for name, path in paths.items():
        if path is not None:
            if path not in read:
                read[path] = read_state_dict(path, dtype)
            sd |= {f"{name}.{k}": v for k, v in part_of(read[path], name, path).items()}
    with torch.device("meta"):
        model = TAESANA(encoder=encoder is not None, decoder=decoder is not None, ops=ops)
    source = " + ".join(str(Path(p)) for p in dict.fromkeys(p for p in paths.values() if p is not None))
    load_strict(model, sd, source)
    model.source = source
    log.info("loaded TAESANA %s from %s (%s)", "+".join(n for n, p in paths.items() if p is not None), source, dtype)
    return model.to(device).eval().requires_grad_(False)
