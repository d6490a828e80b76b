"""Qwen2-Audio (Whisper-style audio encoder + projector, Qwen2 text model): audio only, 1-D RoPE.

transformers has no `get_audio_features` for this family: the tower runs with a bidirectional mask over the
valid mel frames, then the projector, and only the first `out_len` frames of each clip are kept.
"""
from __future__ import annotations

import torch
from transformers.masking_utils import create_bidirectional_mask

from mmpipe.shared.models.base import ModelAdapter
from mmpipe.shared.types import ProcessedItem


class Qwen2AudioAdapter(ModelAdapter):
    family = "qwen2_audio"
    model_types = ("qwen2_audio",)
    modalities = ("audio",)
    tower_modules = ("model.audio_tower", "model.multi_modal_projector")
    auto_class = "multimodal_lm"

    def placeholder_token(self, modality: str) -> str:
        self.check_modality(modality)
        return self.processor.audio_token

    def _item_meta(self, modality: str, tensors: dict[str, torch.Tensor]) -> dict:
        return {"audio_seqlen": int(tensors["feature_attention_mask"].sum())}

    def _encode_batch(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        tower, proj = self.model.model.audio_tower, self.model.model.multi_modal_projector
        feats = self._cat(items, "input_features")
        fmask = self._cat(items, "feature_attention_mask")
        feat_lens, out_lens = tower._get_feat_extract_output_lengths(fmask.sum(-1))
        b, _, n_frames = feats.shape
        max_seq = (n_frames - 2) // 2 + 1
        mask2d = (torch.arange(max_seq, device=feats.device)[None, :] < feat_lens[:, None]).long()
        enc_mask = create_bidirectional_mask(config=tower.config,
                                             inputs_embeds=torch.zeros(b, max_seq, 1, device=feats.device),
                                             attention_mask=mask2d)
        per_clip = proj(tower(feats, attention_mask=enc_mask).last_hidden_state)
        return [per_clip[i, : int(out_lens[i])] for i in range(b)]
