"""InternVL (transformers-format checkpoints, `InternVLForConditionalGeneration`: InternViT tower, pixel shuffle,
MLP projector; Qwen2 text model), images only, 1-D RoPE.

The processor crops each image into the tiles of its best grid (`min_patches`..`max_patches` tiles of the
tower's size, plus a thumbnail when there are several), and every tile gives `image_seq_length` rows after the
pixel shuffle, so an item's row count depends on its size. In the prompt an image is one `<IMG_CONTEXT>` (what
the chat template writes); the processor turns it into `<img>` + rows x `<IMG_CONTEXT>` + `</img>`, and so does
`item_tokens` on token ids (inputs/assemble.py). The tiles of all images of a batch run as one tower batch.

Precomputed `image_embeds`, as vLLM takes them: the rows of one image, a whole number of tiles of
`image_seq_length` rows each. Video (frames as tiles, `Frame{i}:` text between them) is not taken yet.
"""
from __future__ import annotations

from typing import Any

import torch

from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.models._features import flatten_features, split_by_tokens
from mmpipe.shared.models.base import ItemTokens, ModelAdapter
from mmpipe.shared.types import MMEmbedding, ProcessedItem


class InternVLAdapter(ModelAdapter):
    family = "internvl"
    model_types = ("internvl",)
    modalities = ("image",)
    tower_modules = ("model.vision_tower", "model.multi_modal_projector")

    def placeholder_token(self, modality: str) -> str:
        self.check_modality(modality)
        return self.processor.image_token

    def item_tokens(self) -> dict[str, ItemTokens]:
        p = self.processor
        return {"image": ItemTokens((int(p.start_image_token_id),), self.feature_token_id("image"),
                                    (int(p.end_image_token_id),))}

    @property
    def tile_tokens(self) -> int:
        """Rows one tile gives (the processor's `image_seq_length`)."""
        return int(self.processor.image_seq_length)

    def _encode_batch(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        out = self.model.get_image_features(pixel_values=self._cat(items, "pixel_values"))
        return split_by_tokens(flatten_features(out.pooler_output), items)

    def _checked_embedding(self, modality: str, t: torch.Tensor, meta: dict[str, Any]) -> MMEmbedding:
        out = super()._checked_embedding(modality, t, meta)
        if t.shape[0] % self.tile_tokens:
            raise InvalidInputError(f"{modality}_embeds has {t.shape[0]} rows, but an InternVL image is a whole "
                                    f"number of tiles of {self.tile_tokens} rows", param=f"{modality}_embeds")
        return out
