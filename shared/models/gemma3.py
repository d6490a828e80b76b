"""Gemma 3 (SigLIP tower + average-pooling projector, Gemma 3 decoder): images only, 1-D RoPE.

The prompt holds `<start_of_image>` once per image (what Gemma's chat template writes); the processor turns
it into "\\n\\n<start_of_image>" + `mm_tokens_per_image` x `<image_soft_token>` + "<end_of_image>\\n\\n", and so
does `item_tokens` on token ids (inputs/assemble.py). The image's soft tokens attend to each other both ways
during prefill (transformers' `token_type_ids`): the engine does that for the rows of every multimodal run of
a Gemma 3 model (shared/engine/model_spec.py), so the request carries nothing extra.

Not taken, as in vLLM: precomputed `image_embeds` (vLLM's Gemma 3 accepts pixels only) and pan-and-scan
(`do_pan_and_scan`: its crops add text between the image sequences, which this expansion does not write).
"""
from __future__ import annotations

from typing import Any

import torch

from mmpipe.shared.errors import UnsupportedError
from mmpipe.shared.models._features import flatten_features, split_by_tokens
from mmpipe.shared.models.base import ItemTokens, ModelAdapter
from mmpipe.shared.types import MMEmbedding, ProcessedItem


class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    modalities = ("image",)
    tower_modules = ("model.vision_tower", "model.multi_modal_projector")

    def __init__(self, model: Any, processor: Any, **kwargs: Any):
        super().__init__(model, processor, **kwargs)
        if self.mm_processor_kwargs.get("do_pan_and_scan"):
            raise UnsupportedError("Gemma 3 pan-and-scan (do_pan_and_scan) is not supported",
                                   param="mm_processor_kwargs.do_pan_and_scan")

    def placeholder_token(self, modality: str) -> str:
        self.check_modality(modality)
        return self.processor.boi_token

    def feature_token_id(self, modality: str) -> int:
        self.check_modality(modality)
        return int(self.tokenizer.image_token_id)

    def item_tokens(self) -> dict[str, ItemTokens]:
        tok = self.tokenizer
        nl = tuple(tok.encode("\n\n", add_special_tokens=False))
        boi, eoi = tok.convert_tokens_to_ids(tok.boi_token), tok.convert_tokens_to_ids(tok.eoi_token)
        return {"image": ItemTokens(nl + (int(boi),), self.feature_token_id("image"), (int(eoi),) + nl)}

    def embeds_from_user(self, modality: str, value: Any) -> list[MMEmbedding]:
        self.check_modality(modality)
        raise UnsupportedError("Gemma 3 takes images as pixels only (no precomputed image_embeds, as in vLLM)",
                               param=f"{modality}_embeds")

    def _encode_batch(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        out = self.model.get_image_features(pixel_values=self._cat(items, "pixel_values"))
        return split_by_tokens(flatten_features(out.pooler_output), items)
