"""ComfyUI nodes over sana_core. Every node id is public API: chosen once, never renamed."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .conditioning import SanaGemmaTextEncode
from .draft import SanaDraftVAELoader
from .latent import SanaDCAEDecode, SanaDCAEEncode, SanaEmptyLatentImage
from .loaders import (SanaCheckpointLoader, SanaControlNetLoader, SanaDCAELoader, SanaFolderLoader, SanaGemmaLoader,
                      SanaLoraLoader)
from .sampling import SanaPAG, SanaSampler, SanaSamplerSelect, SanaScheduler

NODES = [SanaCheckpointLoader, SanaFolderLoader, SanaLoraLoader, SanaControlNetLoader, SanaGemmaLoader, SanaDCAELoader,
         SanaGemmaTextEncode, SanaEmptyLatentImage, SanaSampler, SanaPAG, SanaSamplerSelect, SanaScheduler,
         SanaDCAEDecode, SanaDCAEEncode, SanaDraftVAELoader]


class SanaExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from . import conditioning, latent, latent_sizes, lora, previews

        previews.install()  # TAESANA live previews under every sampler node (0.3.64 never calls on_load)
        lora.install()  # core's LoRA loaders read Sana LoRAs
        latent.install()  # core's 1/8-scale empty latents make Sana latents of the size asked
        latent_sizes.install()  # core's pixel-size latent nodes (LatentUpscale...) on Sana latents
        conditioning.install()  # core's ConditioningAverage/Concat combine Sana's masks and negative sides too
        return NODES
