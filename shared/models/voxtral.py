"""Voxtral (Whisper-style audio encoder, 4-frame MLP projector, Llama decoder): audio only, 1-D RoPE.

Audio goes in as 30 s chunks: a clip is zero-padded to a whole number of chunks (transformers' and mistral-common's
rule: the processor's `pad_to_multiple_of` samples), its log-mel is cut into chunks of `max_source_positions` mel
frames, and each chunk gives `max_source_positions / 2` encoder frames, 4 of which (the encoder's
`intermediate_size / hidden_size`) make one token: 375 tokens a chunk for every published Voxtral. The encoder
attends within a chunk only, so the chunks of all items of a batch are one tower batch.

The prompt holds one `[AUDIO]` per clip; it becomes `[BEGIN_AUDIO]` and one `[AUDIO]` per embedding row, as
mistral-common's audio encoder writes it (`item_tokens`). VoxtralProcessor takes audio only through
mistral-common's chat encoding, so `preprocess` runs its feature half itself, with the processor's own defaults
and its own `_retrieve_input_features` (the same padding and chunking as `apply_chat_template`). mmpipe reads the
HF tokenizer files of the checkpoint (`processor_kwargs`: not mistral-common's tekken.json), because it renders
prompts with a Jinja chat template and tokenizes text.

Not taken, as in vLLM (whose Voxtral encodes audio through mistral-common): precomputed `audio_embeds`.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from mmpipe.shared.errors import InvalidInputError, UnsupportedError
from mmpipe.shared.models._features import split_by_tokens
from mmpipe.shared.models.base import ItemTokens, ModelAdapter
from mmpipe.shared.types import MediaItem, MMEmbedding, ProcessedItem

BEGIN_AUDIO = "[BEGIN_AUDIO]"


class VoxtralAdapter(ModelAdapter):
    family = "voxtral"
    model_types = ("voxtral",)
    modalities = ("audio",)
    auto_class = "multimodal_lm"
    tower_modules = ("model.audio_tower", "model.multi_modal_projector")
    processor_kwargs: ClassVar[dict[str, Any]] = {"mistral_format": False}

    def placeholder_token(self, modality: str) -> str:
        self.check_modality(modality)
        return self.processor.audio_token

    def item_tokens(self) -> dict[str, ItemTokens]:
        begin = int(self.tokenizer.convert_tokens_to_ids(BEGIN_AUDIO))
        return {"audio": ItemTokens((begin,), self.feature_token_id("audio"), ())}

    @property
    def tokens_per_chunk(self) -> int:
        cfg = self.model.config.audio_config
        return int(cfg.max_source_positions) * int(cfg.hidden_size) // int(cfg.intermediate_size)

    def preprocess(self, item: MediaItem, mm_processor_kwargs: dict[str, Any] | None = None) -> ProcessedItem:
        self.check_modality(item.modality)
        mm = self.mm_processor_kwargs if mm_processor_kwargs is None else mm_processor_kwargs
        kw = dict(self.processor._merge_kwargs(**mm)["audio_kwargs"])
        chunk = kw.pop("max_source_positions")
        kw["sampling_rate"] = self.audio_sampling_rate
        try:
            feats = self.processor._retrieve_input_features([item.data], chunk, **kw)
        except (ValueError, TypeError, RuntimeError) as e:  # the feature extractor's own validation of the clip
            raise InvalidInputError(f"could not preprocess audio: {e}", param="audio") from e
        meta = {"num_tokens": int(feats.shape[0]) * self.tokens_per_chunk}
        return ProcessedItem(modality="audio", key=item.content_hash, tensors={"input_features": feats}, meta=meta)

    def embeds_from_user(self, modality: str, value: Any) -> list[MMEmbedding]:
        self.check_modality(modality)
        raise UnsupportedError("Voxtral takes audio as waveforms only (no precomputed audio_embeds, as in vLLM)",
                               param=f"{modality}_embeds")

    def _encode_batch(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        out = self.model.get_audio_features(self._cat(items, "input_features"))
        return split_by_tokens(out.pooler_output, items)
