"""Training Sana DiTs (LoRA and full fine-tuning) with NVlabs' recipe: `python -m sana_core.train --help`.

Modules: `config` (every option), `data` (folders, bad-data report, buckets, feature cache), `recipe` (timestep
densities, loss weighting, flow-matching loss, caption dropout), `lora` (adapters saved in diffusers' names),
`export` (the NVlabs-layout full checkpoint), `trainer` (the accelerate loop); its peak memory is measured by `bench/train_memory.py`.
Training needs `accelerate` (and `came-pytorch` for CAME): `pip install -r requirements-train.txt`.
"""
