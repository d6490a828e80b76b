"""LLaVA-1.5 (CLIP tower + projector, Llama text model): images only, 1-D RoPE."""
from __future__ import annotations

import torch

from mmpipe.shared.models._features import flatten_features, split_by_tokens
from mmpipe.shared.models.base import ModelAdapter
from mmpipe.shared.types import ProcessedItem


class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_types = ("llava",)
    modalities = ("image",)
    tower_modules = ("model.vision_tower", "model.multi_modal_projector")

    def placeholder_token(self, modality: str) -> str:
        self.check_modality(modality)
        return self.processor.image_token

    def _encode_batch(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        out = self.model.get_image_features(pixel_values=self._cat(items, "pixel_values"))
        return split_by_tokens(flatten_features(out.pooler_output), items)
