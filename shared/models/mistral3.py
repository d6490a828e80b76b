"""Mistral 3 / Pixtral (Pixtral tower with 2-D RoPE, patch merger + projector, Mistral decoder): images, 1-D RoPE.

Every image keeps its own size (its longest edge fit into the processor's `longest_edge`, both edges rounded
to the merged patch), so its token count and layout depend on it: `[IMG]` once per merged patch, each row of
patches closed by `[IMG_BREAK]` and the last one by `[IMG_END]`. The prompt holds one `[IMG]` per image; the
item's expansion (the processor's own token ids for one placeholder) travels in its metadata, and
shared/inputs/assemble.py inserts it as is, so the row breaks come from transformers' rule, not from ours.

The tower runs on a batch of images of different sizes at once: each is padded to the largest height and
width of the batch, and `image_sizes` tells transformers' Pixtral tower how much of each to read (it crops the
patch grid to the image, attends block-diagonally across images and gives each its own 2-D positions), so the
padding never reaches a feature.

Not taken, as in vLLM (whose Pixtral-HF path accepts pixels only): precomputed `image_embeds`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmpipe.shared.errors import UnsupportedError
from mmpipe.shared.models.base import ModelAdapter
from mmpipe.shared.types import MMEmbedding, ProcessedItem


class Mistral3Adapter(ModelAdapter):
    family = "mistral3"
    model_types = ("mistral3",)
    modalities = ("image",)
    prompt_expansion = True
    tower_modules = ("model.vision_tower", "model.multi_modal_projector")

    def placeholder_token(self, modality: str) -> str:
        self.check_modality(modality)
        return self.processor.image_token

    def embeds_from_user(self, modality: str, value: Any) -> list[MMEmbedding]:
        self.check_modality(modality)
        raise UnsupportedError("Mistral 3 takes images as pixels only (no precomputed image_embeds, as in vLLM)",
                               param=f"{modality}_embeds")

    def _encode_batch(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        pixels = [it.tensors["pixel_values"] for it in items]
        h = max(int(p.shape[-2]) for p in pixels)
        w = max(int(p.shape[-1]) for p in pixels)
        # zero padding to one (B, C, h, w) batch; image_sizes keeps each image's own extent
        batch = torch.cat([F.pad(p, (0, w - p.shape[-1], 0, h - p.shape[-2])) for p in pixels], dim=0)
        out = self.model.get_image_features(pixel_values=batch.to(self.device, self.model.dtype),
                                            image_sizes=self._cat(items, "image_sizes"))
        return list(out.pooler_output)
