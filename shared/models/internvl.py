"""InternVL (transformers-format checkpoints, `InternVLForConditionalGeneration`: InternViT tower, pixel shuffle,
MLP projector; Qwen2 text model): image and video, 1-D RoPE.

The processor crops each image into the tiles of its best grid (`min_patches`..`max_patches` tiles of the
tower's size, plus a thumbnail when there are several), and every tile gives `image_seq_length` rows after the
pixel shuffle, so an item's row count depends on its size. In the prompt an image is one `<IMG_CONTEXT>` (what
the chat template writes); the processor turns it into `<img>` + rows x `<IMG_CONTEXT>` + `</img>`, and so does
`item_tokens` on token ids (inputs/assemble.py). The tiles of all images of a batch run as one tower batch.

Video: each frame is one tile of the tower's size, and the processor writes a video as lines
`Frame{i}: <img>` rows `</img>`, so a video placeholder (`<video>`) expands to text tokens too; the item keeps
the processor's expansion (token ids) in its metadata (`prompt_expansion`, as Qwen3-VL's timestamps), which
inputs/assemble.py inserts as is. The processor hands the frames to the model as `pixel_values`, like tiles.

Precomputed `image_embeds`, as vLLM takes them: the rows of one image, a whole number of tiles of
`image_seq_length` rows each. Precomputed video embeddings are refused (the prompt needs each frame's line).
"""
from __future__ import annotations

from typing import Any

import torch

from mmpipe.shared.errors import InvalidInputError, UnsupportedError
from mmpipe.shared.models._features import flatten_features, split_by_tokens
from mmpipe.shared.models.base import ItemTokens, ModelAdapter
from mmpipe.shared.types import MMEmbedding, ProcessedItem


class InternVLAdapter(ModelAdapter):
    family = "internvl"
    model_types = ("internvl",)
    modalities = ("image", "video")
    prompt_expansion = True
    tower_modules = ("model.vision_tower", "model.multi_modal_projector")

    def placeholder_token(self, modality: str) -> str:
        self.check_modality(modality)
        return self.processor.image_token if modality == "image" else self.processor.video_token

    def feature_token_id(self, modality: str) -> int:
        """Image tiles and video frames both become `<IMG_CONTEXT>` rows."""
        self.check_modality(modality)
        return int(self.processor.image_token_id)

    def item_tokens(self) -> dict[str, ItemTokens]:
        """An image without the processor's expansion (precomputed embeddings) is wrapped as the processor does;
        a video always carries its expansion (its frame lines)."""
        p = self.processor
        ctx = self.feature_token_id("image")
        return {"image": ItemTokens((int(p.start_image_token_id),), ctx, (int(p.end_image_token_id),)),
                "video": ItemTokens((), ctx, ())}

    @property
    def tile_tokens(self) -> int:
        """Rows one tile gives (the processor's `image_seq_length`)."""
        return int(self.processor.image_seq_length)

    def _encode_batch(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        # tiles and frames alike: (n, C, H, W) per item, `image_seq_length` rows each
        out = self.model.get_image_features(pixel_values=self._cat(items, "pixel_values"))
        return split_by_tokens(flatten_features(out.pooler_output), items)

    def embeds_from_user(self, modality: str, value: Any) -> list[MMEmbedding]:
        self.check_modality(modality)
        if modality == "video":
            raise UnsupportedError("precomputed video embeddings are not supported for InternVL (the prompt needs "
                                   "each frame's line)", param="video_embeds")
        return super().embeds_from_user(modality, value)

    def _checked_embedding(self, modality: str, t: torch.Tensor, meta: dict[str, Any]) -> MMEmbedding:
        out = super()._checked_embedding(modality, t, meta)
        if t.shape[0] % self.tile_tokens:
            raise InvalidInputError(f"{modality}_embeds has {t.shape[0]} rows, but an InternVL image is a whole "
                                    f"number of tiles of {self.tile_tokens} rows", param=f"{modality}_embeds")
        return out
