"""Qwen2.5-Omni thinker: image, video and audio in one model, Qwen2 text model with M-RoPE. A full checkpoint
(`model_type: qwen2_5_omni`) is served as its thinker; audio out (talker, token2wav) is not served.

The cheap test of the adapter design: vision comes from the Qwen-VL base, audio from `get_audio_features`,
and positions from the thinker's own `get_rope_index` (which also needs each audio clip's length).
"""
from __future__ import annotations

from typing import Any

import torch

from mmpipe.shared.models._features import split_by_tokens
from mmpipe.shared.models.qwen_vl import QwenVLBase
from mmpipe.shared.types import MMEmbedding, ProcessedItem


class Qwen25OmniThinkerAdapter(QwenVLBase):
    family = "qwen2_5_omni"
    # an extracted thinker, or a published checkpoint (thinker + talker + token2wav) served as its thinker: the
    # talker's and token2wav's weights are never read (registry.resolve_model, checkpoint.Checkpoint's prefix)
    model_types = ("qwen2_5_omni_thinker", "qwen2_5_omni")
    served_submodel = {"qwen2_5_omni": "thinker"}
    modalities = ("image", "video", "audio")
    auto_class = "multimodal_lm"
    tower_modules = ("model.visual", "model.audio_tower")

    def placeholder_token(self, modality: str) -> str:
        self.check_modality(modality)
        return {"image": self.processor.image_token, "video": self.processor.video_token,
                "audio": self.processor.audio_token}[modality]

    def _item_meta(self, modality: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if modality == "audio":
            return {"audio_seqlen": int(tensors["feature_attention_mask"].sum())}
        return super()._item_meta(modality, tensors)

    def _encode_batch(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        if modality != "audio":
            return self._encode_vision(modality, items)
        # Clips are padded to the same mel length by the feature extractor, so they stack; our encoder forward
        # (towers/omni_audio.py) takes the valid frames as transformers' get_audio_features selects them, with
        # the clip lengths as host ints (no sync, one attention call per chunk length and layer).
        from mmpipe.shared.models.towers.omni_audio import OmniAudioTower, find_audio_tower

        feats = torch.cat([it.tensors["input_features"] for it in items], dim=0)
        mask = torch.cat([it.tensors["feature_attention_mask"] for it in items], dim=0).bool()
        lens = [int(n) for n in mask.sum(-1).tolist()]
        valid = feats.permute(0, 2, 1)[mask].permute(1, 0)
        return split_by_tokens(OmniAudioTower.of(find_audio_tower(self.model))(valid, lens), items)

    def _checked_embedding(self, modality: str, t: torch.Tensor, meta: dict[str, Any]) -> MMEmbedding:
        if modality == "audio" and "audio_seqlen" not in meta:
            from mmpipe.shared.errors import UnsupportedError

            raise UnsupportedError("precomputed audio embeddings are not supported for the Omni thinker "
                                   "(M-RoPE needs the clip's mel length)", param="audio_embeds")
        return super()._checked_embedding(modality, t, meta)

    def mrope_positions(self, token_ids: torch.Tensor, embeddings: list[MMEmbedding]) -> tuple[torch.Tensor, int]:
        ids = token_ids.reshape(1, -1)
        audio = [e.meta["audio_seqlen"] for e in embeddings if e.modality == "audio"]
        secs = [e.meta.get("second_per_grid_t", 1.0) for e in embeddings if e.modality == "video"]
        pos, delta = self.model.model.get_rope_index(
            ids, image_grid_thw=self._grids(embeddings, "image"), video_grid_thw=self._grids(embeddings, "video"),
            attention_mask=torch.ones_like(ids), use_audio_in_video=False,
            audio_seqlens=torch.tensor(audio, dtype=torch.long) if audio else None,
            second_per_grids=torch.tensor(secs) if secs else None)
        return pos[:, 0], int(delta.reshape(-1)[0])
