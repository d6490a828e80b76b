"""Idefics3 (SigLIP-style tower, pixel-shuffle connector, Llama decoder): images only, 1-D RoPE.

The processor scales an image to a longest edge of `size["longest_edge"]`, splits it into square tiles of
`max_image_size["longest_edge"]` (the tower's input size) plus the whole image shrunk to one tile (the global
image), and writes one `<image>` placeholder as that grid:

    <fake_token_around_image><row_1_col_1><image>*n ... <fake_token_around_image><row_r_col_c><image>*n \\n  (a row)
    \\n<fake_token_around_image><global-img><image>*n<fake_token_around_image>

(an image no larger than one tile, or any image with `do_image_splitting` off, is the last line alone). So the
number of rows depends on the image size, and the expansion holds marker and newline tokens between the runs
of feature rows. It starts and ends with a special token, so it tokenizes the same inside any prompt: the item
keeps the processor's own expansion as token ids (`prompt_expansion`, as Qwen3-VL's timestamps) and
shared/inputs/expand.py writes it in place of the placeholder, one span per run of rows.

Every tile is the tower's own size and the tiles of one image are independent, so the tiles of all images of
a batch go through the tower as one batch (transformers' `get_image_features` flattens them and drops only
all-zero padding tiles, which a normalised uint8 image never is).

Not taken: precomputed `image_embeds` (the prompt's grid of row/column markers follows from the image size,
which embeddings do not carry), and a `max_image_size` other than the tower's input size (the processor would
cut tiles the tower and `image_seq_len` were not built for).
"""
from __future__ import annotations

from typing import Any

import torch

from mmpipe.shared.errors import UnsupportedError
from mmpipe.shared.models._features import flatten_features, split_by_tokens
from mmpipe.shared.models.base import ModelAdapter
from mmpipe.shared.models.mm_kwargs import PARAM
from mmpipe.shared.types import MMEmbedding, ProcessedItem


class Idefics3Adapter(ModelAdapter):
    family = "idefics3"
    model_types = ("idefics3",)
    modalities = ("image",)
    prompt_expansion = True
    tower_modules = ("model.vision_model", "model.connector")
    lm_modules = ("model.text_model", "lm_head")

    def __init__(self, model: Any, processor: Any, **kwargs: Any):
        super().__init__(model, processor, **kwargs)
        tile = self.mm_processor_kwargs.get("max_image_size", processor.image_processor.max_image_size)
        size = int(model.config.vision_config.image_size)
        if not isinstance(tile, dict) or tile.get("longest_edge") != size:
            raise UnsupportedError(f"{self.family}: max_image_size must be {{'longest_edge': {size}}}, the vision "
                                   f"tower's input size; got {tile!r}", param=f"{PARAM}.max_image_size")

    def placeholder_token(self, modality: str) -> str:
        self.check_modality(modality)
        return self.processor.image_token

    def _call_kwargs(self, modality: str, mm: dict[str, Any]) -> dict[str, Any]:
        # the expansion is kept as token ids: never with the BOS a Llama tokenizer would put in front of it
        return {**mm, "add_special_tokens": False}

    def embeds_from_user(self, modality: str, value: Any) -> list[MMEmbedding]:
        self.check_modality(modality)
        raise UnsupportedError(f"{self.family} takes images as pixels only: the prompt's tile grid follows from the "
                               "image size, which precomputed image_embeds do not carry", param=f"{modality}_embeds")

    def _encode_batch(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        # (1, tiles, C, H, W) per item -> (1, all tiles, C, H, W): one tower call for the batch
        pixels = torch.cat([it.tensors["pixel_values"] for it in items], dim=1).to(self.device, self.model.dtype)
        mask = torch.cat([it.tensors["pixel_attention_mask"] for it in items], dim=1).to(self.device)
        out = self.model.get_image_features(pixel_values=pixels, pixel_attention_mask=mask)
        return split_by_tokens(flatten_features(out.pooler_output), items)
