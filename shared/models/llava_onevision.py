"""LLaVA-OneVision (SigLIP tower, anyres image tiles, pooled video frames; Qwen2 text model), 1-D RoPE.

Items are encoded one at a time: anyres gives every image its own number of tiles, so their pixel tensors
do not stack without padding that would change nothing but cost compute.
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
