"""Qwen3-VL, dense (`qwen3_vl`) and sparse-MoE (`qwen3_vl_moe`): image and video into a Qwen3 decoder (q/k norm)
with interleaved M-RoPE and DeepStack. The two share the towers, the processor and every rule here; only the
decoder's MLP differs (a router and experts in the MoE layers), which the engine reads from the modules
(shared/engine/model_spec.py, moe.py), so the MoE family is this adapter under another model type.

DeepStack: the tower also returns features from some of its layers (`deepstack_visual_indexes`); transformers
adds feature j to the hidden states after decoder layer j at the image positions. Our embedding of an item is
therefore `(num_tokens, hidden * (1 + num_deepstack))`: the base embedding, then each deepstack feature, along
the hidden dimension (vLLM's `image_embeds` layout for this family); the engine splits the row
(shared/engine/decoder.py). The rows travel as one tensor, so the embedding cache, the encoder -> generator hop
and the engine need no second channel.

Video: the processor writes each frame pair as `<t seconds><|vision_start|>pads<|vision_end|>`, so a video
placeholder expands to text tokens too; the item's expansion (token ids of the processor's own output for one
placeholder) travels in its metadata and shared/inputs/assemble.py inserts it as is.

The towers run through transformers' own `get_image_features` (not shared/models/towers/qwen_vision.py, whose
fast path is the Qwen2/2.5 ViT: Qwen3-VL's tower adds interpolated learned position embeddings and the
deepstack mergers, which it does not have).
"""
from __future__ import annotations

from typing import Any

import torch

from mmpipe.shared.errors import InvalidInputError, UnsupportedError
from mmpipe.shared.models.qwen_vl import Qwen2VLAdapter
from mmpipe.shared.types import MMEmbedding, ProcessedItem


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    modalities = ("image", "video")
    prompt_expansion = True

    @property
    def num_deepstack(self) -> int:
        return len(self.model.config.vision_config.deepstack_visual_indexes or ())

    @property
    def embed_width(self) -> int:
        """One row of an item's embedding: the base embedding and each deepstack feature."""
        return self.hidden_size * (1 + self.num_deepstack)

    def _encode_batch(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        key, gkey = ("pixel_values", "image_grid_thw") if modality == "image" else (
            "pixel_values_videos", "video_grid_thw")
        inner = self.model.model
        fn = inner.get_image_features if modality == "image" else inner.get_video_features
        out = fn(self._cat(items, key), self._cat(items, gkey))
        per_layer = out.deepstack_features  # [layer][item] -> (tokens, hidden)
        return [torch.cat([base, *(layer[i] for layer in per_layer)], dim=-1)
                for i, base in enumerate(out.pooler_output)]

    def _video_rope_grids(self, videos: list[MMEmbedding]) -> list[list[int]]:
        """One (1, h, w) grid per frame: the timestamps between frames split a video into runs (transformers'
        Qwen3-VL `get_rope_index` splits `video_grid_thw` the same way)."""
        return [[1, h, w] for e in videos for t, h, w in [e.meta["grid_thw"]] for _ in range(int(t))]

    def _embeds_from_dict(self, modality: str, value: dict) -> list[MMEmbedding]:
        if modality == "video":
            raise UnsupportedError("precomputed video embeddings are not supported for Qwen3-VL (the prompt needs "
                                   "each frame's timestamp)", param="video_embeds")
        return super()._embeds_from_dict(modality, value)

    def _checked_embedding(self, modality: str, t: torch.Tensor, meta: dict[str, Any]) -> MMEmbedding:
        param = f"{modality}_embeds"
        if t.ndim == 2 and t.shape[1] != self.embed_width:
            raise InvalidInputError(
                f"{param} rows are {t.shape[1]} wide, but Qwen3-VL rows carry the base embedding and "
                f"{self.num_deepstack} deepstack features concatenated along the hidden dimension: "
                f"{self.hidden_size} * (1 + {self.num_deepstack}) = {self.embed_width}", param=param)
        # the base class checks the width against the text hidden size: check the rest on a base-width view
        checked = super()._checked_embedding(modality, t[:, :self.hidden_size] if t.ndim == 2 else t, meta)
        if not torch.isfinite(t).all():
            raise InvalidInputError(f"{param} must be finite floating point values", param=param)
        return MMEmbedding(modality=modality, tensor=t.to(self.model.dtype), meta=checked.meta)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
