"""LLaVA-OneVision (SigLIP tower, anyres image tiles, pooled video frames; Qwen2 text model), 1-D RoPE.

Images: anyres gives every image its own number of tiles, so the tiles of ALL images of a batch go through
the tower as one 4-D batch, which transformers' `get_image_features` splits back by each image's size (no
padding, one tower call). Videos: one call per video, whose frames are the tower's batch.
"""
from __future__ import annotations

import torch

from mmpipe.shared.models._features import flatten_features
from mmpipe.shared.models.base import ModelAdapter
from mmpipe.shared.types import ProcessedItem


class LlavaOnevisionAdapter(ModelAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    modalities = ("image", "video")
    tower_modules = ("model.vision_tower", "model.multi_modal_projector", "model.image_newline")

    def placeholder_token(self, modality: str) -> str:
        self.check_modality(modality)
        return self.processor.image_token if modality == "image" else self.processor.video_token

    def _encode_batch(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        if modality == "image" and self._tiles_match(items):
            # (1, tiles, C, H, W) per item -> (all tiles, C, H, W); without batch_num_images every image is
            # tiled (anyres), exactly as one call per item with batch_num_images=[1]
            tiles = [it.tensors["pixel_values"].reshape(-1, *it.tensors["pixel_values"].shape[-3:]) for it in items]
            pixels = torch.cat(tiles, dim=0).to(self.device)
            out = self.model.get_image_features(pixel_values=pixels.to(self.model.dtype),
                                                image_sizes=self._cat(items, "image_sizes"))
            return [flatten_features(f) for f in out.pooler_output]
        feats = []
        for it in items:
            if modality == "image":
                out = self.model.get_image_features(
                    pixel_values=self._cat([it], "pixel_values"), image_sizes=it.tensors["image_sizes"].to(self.device),
                    batch_num_images=torch.tensor([1], device=self.device))
            else:
                out = self.model.get_video_features(pixel_values_videos=self._cat([it], "pixel_values_videos"))
            feats.append(flatten_features(out.pooler_output))
        return feats

    def _tiles_match(self, items: list[ProcessedItem]) -> bool:
        """Whether each item holds exactly the tiles its image size implies (what the batched split assumes)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.model.config
        for it in items:
            px, sizes = it.tensors["pixel_values"], it.tensors["image_sizes"]
            if px.ndim != 5 or px.shape[0] != 1 or sizes.shape[0] != 1:
                return False
            n = image_size_to_num_patches(image_size=sizes[0].tolist(), grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size)
            if n != px.shape[1]:
                return False
        return True
