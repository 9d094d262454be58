"""Tiny random Sana models in the real file layouts, for tests and for trying the pipeline without downloads.

``python -m sana_core.tiny OUT_DIR`` writes a complete diffusers-style Sana folder (transformer, vae,
text_encoder, tokenizer, scheduler, model_index.json) with random weights: the images it makes are noise,
but every code path of loading and generation runs.
"""
from __future__ import annotations
