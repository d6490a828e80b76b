"""LLaVA-NeXT (CLIP tower, anyres tiles with unpadding and the image-newline row; Llama / Mistral text model),
images only, 1-D RoPE.

The processor tiles each image into the tiles of its best-fitting `image_grid_pinpoints` resolution plus the
whole image resized; transformers' `pack_image_features` unpads the tiles' feature grid back to the image's
aspect ratio and ends each feature row with `image_newline`, so an item's number of rows depends on its size
(the processor's placeholder count is the truth, `ModelAdapter.preprocess`). The tiles of ALL images of a batch
go through the tower as one 4-D batch, which `get_image_features` splits back by each image's size.

Precomputed `image_embeds` are the packed rows of one image (newline rows included), as vLLM takes them.
"""
from __future__ import annotations

import torch

from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.models.base import ModelAdapter
from mmpipe.shared.types import ProcessedItem


class LlavaNextAdapter(ModelAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    modalities = ("image",)
    tower_modules = ("model.vision_tower", "model.multi_modal_projector", "model.image_newline")

    def placeholder_token(self, modality: str) -> str:
        self.check_modality(modality)
        return self.processor.image_token

    def _encode_batch(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        sizes = self._cat(items, "image_sizes")
        tiles = torch.cat([self._tiles(it, size) for it, size in zip(items, sizes.tolist())], dim=0)
        out = self.model.get_image_features(pixel_values=tiles.to(self.device, self.model.dtype), image_sizes=sizes)
        return list(out.pooler_output)

    def _tiles(self, item: ProcessedItem, size: list[int]) -> torch.Tensor:
        """The item's (tiles, C, H, W): exactly the tiles its image size implies (what the batched split assumes;
        a processor batch pads every image to the most tiles, one item per call pads none)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        n = image_size_to_num_patches(image_size=size, grid_pinpoints=cfg.image_grid_pinpoints,
                                      patch_size=cfg.vision_config.image_size)
        px = item.tensors["pixel_values"]
        px = px.reshape(-1, *px.shape[-3:])
        if px.shape[0] < n:
            raise InvalidInputError(f"an image of size {size} needs {n} anyres tiles, its pixel_values hold "
                                    f"{px.shape[0]}", param="pixel_values")
        return px[:n]
