"""Our forward of the Qwen2.5-Omni thinker's audio encoder (`Qwen2_5OmniAudioEncoder`) over its own weights.

transformers cuts each clip's mel frames into chunks of `2 * n_window` frames, runs the two convolutions on the
padded chunks, and then, in EVERY layer, splits the rows into one SDPA call per chunk after a `.tolist()` of
the GPU chunk lengths (a 30 s clip is 15 chunks: 15 calls and a host sync per layer, 32 layers). Here the chunk
lengths come from the clips' mel lengths, plain ints known on the host, so the chunking, the valid-row
indices, the attention plan and the pooling indices are computed once per batch; the rows are ordered so that
all full chunks of the batch (and then the tails, by length) are contiguous, and each layer attends in one
batched SDPA per distinct chunk length (usually one or two calls), with the token-wise parts of each layer in
blocks.py (compiled on CUDA).

The numbers are transformers' (the same operations in the same order; the rows go back into transformers'
order before the stride-2 pooling, which pairs neighbouring rows).

Owns: the Omni audio encoder forward. Must not: compute mel features or know about adapters.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmpipe.shared.models.towers.blocks import TokenOps, describe_block
from mmpipe.shared.models.towers.compile_config import compile_towers_enabled
from mmpipe.shared.models.towers.varlen import VarlenPlan, varlen_sdpa

def find_audio_tower(model: nn.Module) -> nn.Module:
    """The audio encoder of an Omni thinker (`model.model.audio_tower` in transformers 5)."""
    for m in (getattr(model, "model", None), model):
        enc = getattr(m, "audio_tower", None) if m is not None else None
        if enc is not None:
            return enc
    raise AttributeError(f"{type(model).__name__} has no audio encoder (.model.audio_tower)")


class OmniAudioTower:
    """The forward of one HF `Qwen2_5OmniAudioEncoder`, chunks attended in one batched call per length."""

    def __init__(self, encoder: nn.Module, *, compile: bool | None = None, compile_backend: str = "inductor"):
        self.encoder = encoder
        self.layers = list(encoder.layers)
        ref = encoder.conv1.weight
        self.device, self.dtype = ref.device, ref.dtype
        self.n_window = int(encoder.n_window)
        attn0 = self.layers[0].self_attn
        self.scale = float(attn0.scaling)
        described = [describe_block(lay, lay.self_attn, lay, lay.self_attn_layer_norm, lay.final_layer_norm,
                                    lay.self_attn.out_proj, int(lay.self_attn.num_heads)) for lay in self.layers]
        self.spec = described[0][0]
        self.weights = [d[1] for d in described]
        self.compile = compile_towers_enabled(self.device.type, compile)
        self.ops = TokenOps(self.spec, described[0][2], compile=self.compile, backend=compile_backend,
                            name=type(encoder).__name__)

    @classmethod
    def of(cls, encoder: nn.Module, *, compile: bool | None = None) -> OmniAudioTower:
        resolved = compile_towers_enabled(encoder.conv1.weight.device.type, compile)
        store = encoder.__dict__.setdefault("_mmpipe_towers", {})  # lives and dies with the module
        key = (cls.__name__, resolved)
        if key not in store:
            store[key] = cls(encoder, compile=resolved)
        return store[key]

    def output_lengths(self, feature_lens: Sequence[int]) -> list[int]:
        """Rows out per clip for its mel length (transformers' `_get_feat_extract_output_lengths`)."""
        return [((n - 1) // 2 + 1 - 2) // 2 + 1 for n in feature_lens]

    @torch.inference_mode()
    def __call__(self, features: torch.Tensor, feature_lens: Sequence[int]) -> torch.Tensor:
        """(sum of output_lengths, output_dim) for `features` (num_mel_bins, sum of feature_lens): the clips'
        valid mel frames, concatenated in order (what transformers' `get_audio_features` selects)."""
        lens = [int(n) for n in feature_lens]
        if features.shape[-1] != sum(lens) or min(lens, default=1) < 1:
            raise ValueError(f"features have {features.shape[-1]} frames, the clip lengths {lens} sum to {sum(lens)}")
        enc = self.encoder
        step = 2 * self.n_window
        chunks = [c for n in lens for c in [step] * ((n - 1) // step) + [n - (n - 1) // step * step]]
        feats = features.to(device=self.device, dtype=self.dtype)
        padded = nn.utils.rnn.pad_sequence(list(feats.T.split(chunks, dim=0)), batch_first=True).transpose(1, 2)
        chunk_t = torch.tensor(chunks, device=self.device)
        mask = (torch.arange(padded.shape[2], device=self.device) < chunk_t.unsqueeze(1)).unsqueeze(1).long()
        x = F.gelu(enc.conv1(padded)) * mask
        x = F.gelu(enc.conv2(x)).transpose(1, 2)
        x = x + enc.positional_embedding.positional_embedding[: x.shape[1], :].unsqueeze(0).to(x.dtype)
        after = np.array([(c - 1) // 2 + 1 for c in chunks], dtype=np.int64)
        width = x.shape[1]
        valid = (np.arange(width)[None, :] < after[:, None]).ravel().nonzero()[0]
        x = x.reshape(-1, x.shape[-1]).index_select(0, torch.from_numpy(valid).to(self.device))

        starts = np.concatenate([[0], np.cumsum(after)[:-1]])
        plan, _ = VarlenPlan.build([np.arange(s, s + n) for s, n in zip(starts.tolist(), after.tolist())],
                                   int(after.sum()))
        plan = plan.to(self.device)
        if plan.gather is not None:  # order the rows by chunk length once, instead of in every layer
            x = x.index_select(0, plan.gather)
        in_order = plan.in_order()
        clamp = torch.finfo(x.dtype).max - 1000 if x.dtype == torch.float16 else None
        for w in self.weights:
            q, k, v = self.ops.pre(x, None, None, w)
            x = self.ops.post(x, varlen_sdpa(q, k, v, in_order, self.scale), w)
            if clamp is not None:
                x = torch.clamp(x, min=-clamp, max=clamp)
        if plan.scatter is not None:
            x = x.index_select(0, plan.scatter)

        pool = _pool_indices(lens)
        pool_t = torch.from_numpy(pool).to(self.device)
        x = (x[pool_t] + x[pool_t + 1]) / 2
        return enc.proj(enc.ln_post(x))


def _pool_indices(feature_lens: Sequence[int]) -> np.ndarray:
    """First row of each stride-2 pooling pair per clip (transformers' `get_pool_indices`, on the host)."""
    out = []
    offset = 0
    for n in feature_lens:
        after = (n - 1) // 2 + 1
        pooled = (after - 2) // 2 + 1
        out.append(offset + 2 * np.arange(pooled, dtype=np.int64))
        offset += after
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
