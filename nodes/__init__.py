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
        from .previews import install

        install()  # TAESANA live previews under every sampler node (here: ComfyUI 0.3.64 never calls on_load)
        return NODES
