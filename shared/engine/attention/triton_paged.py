"""CUDA attention backend: the Triton split-K paged decode kernel for the one-token rows, SDPA per sequence
for prefill chunks (GQA native; K/V gathered from the blocks only when a cached prefix exists)."""
from __future__ import annotations

import torch

from .base import AttentionBackend, AttentionMetadata
from .torch_ref import attend_one


class TritonPagedBackend(AttentionBackend):
    name = "triton"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.head_dim & (self.head_dim - 1):
            raise ValueError(f"the triton backend needs a power-of-two head_dim, got {self.head_dim}")
        from ..kernels.triton_attention import choose_num_splits, paged_decode

        self._paged_decode = paged_decode
        self._choose = choose_num_splits
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        self.num_sms = props.multi_processor_count

    def num_splits(self, num_seqs: int) -> int:
        return self._choose(num_seqs, self.num_kv_heads, self.num_sms)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # q may be a strided view
        nd = meta.num_decodes
        if nd:
            self._paged_decode(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], self.scale,
                               self.num_splits(nd), out=out[:nd])
        qsl, lens = meta.query_start_loc_host, meta.seq_lens_host
        bs = self.block_size
        for i in range(nd, meta.num_seqs):
            s, e, ctx = qsl[i], qsl[i + 1], lens[i]
            if e - s == ctx:
                kk, vv = k[s:e], v[s:e]
            else:  # chunk after a cached prefix: gather the whole context from the blocks (device-side table)
                blocks = meta.block_tables[i, : -(-ctx // bs)].long()
                kk = k_cache.index_select(0, blocks).flatten(0, 1)[:ctx]
                vv = v_cache.index_select(0, blocks).flatten(0, 1)[:ctx]
            out[s:e] = attend_one(q[s:e], kk, vv, self.scale)
        return out
