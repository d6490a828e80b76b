"""CUDA attention backend: the Triton split-K paged decode kernel for the one-token rows, and one Triton
prefill kernel (kernels/triton_prefill.py) for all prefill chunks of the step: cached prefix read through the
block table without a mask, the chunk itself causal, one online softmax. No gather, no dense mask and no
per-shape plans, so chunks of any length after any prefix cost what their FLOPs cost.

`prefill_impl = "sdpa"` (or MMPIPE_PREFILL_ATTN=sdpa) keeps the previous path, per-sequence SDPA with a gather
and a boolean mask after a cached prefix, for A/B benchmarks."""
from __future__ import annotations

import os

import torch

from .base import AttentionBackend, AttentionMetadata
from .torch_ref import attend_cached, attend_one


class TritonPagedBackend(AttentionBackend):
    name = "triton"
    # Most key splits per prefill query block (choose_prefill_splits). Read when a step runs, so a CUDA graph
    # keeps the value it was captured with; benchmarks set the class attribute before building an engine.
    prefill_max_splits = 8

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.head_dim & (self.head_dim - 1) or self.head_dim < 16:
            raise ValueError(f"the triton backend needs a power-of-two head_dim >= 16, got {self.head_dim}")
        from ..kernels.triton_attention import choose_num_splits, paged_decode
        from ..kernels.triton_prefill import choose_prefill_splits, prefill_attention, prefill_block_m, prefill_work

        self._paged_decode = paged_decode
        self._prefill = prefill_attention
        self._prefill_work = prefill_work
        self._prefill_block_m = prefill_block_m
        self._choose = choose_num_splits
        self._choose_prefill = choose_prefill_splits
        # the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) runs without a GPU; its SM count is moot
        self.num_sms = (torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
                        if torch.cuda.is_available() else 8)
        self.prefill_impl = os.environ.get("MMPIPE_PREFILL_ATTN", "triton")
        if self.prefill_impl not in ("triton", "sdpa"):
            raise ValueError(f"MMPIPE_PREFILL_ATTN must be triton or sdpa, got {self.prefill_impl!r}")

    def num_splits(self, num_seqs: int) -> int:
        return self._choose(num_seqs, self.num_kv_heads, self.num_sms)

    def prefill_splits(self, work_items: int, num_rows: int, block_m: int) -> int:
        """Key splits per query block: from the work list's length, or in a CUDA graph (whose list is padded)
        from the most query blocks the step's rows can hold, whichever is smaller."""
        items = min(work_items, -(-num_rows // block_m))
        return self._choose_prefill(items, self.num_heads, self.num_sms, self.prefill_max_splits)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, window: int | None = None) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # q may be a strided view
        nd = meta.num_decodes
        if nd:
            self._paged_decode(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], self.scale,
                               self.num_splits(nd), out=out[:nd], window=window, softcap=self.softcap)
        if nd == meta.num_seqs:
            return out
        qsl = meta.query_start_loc_host
        if self.prefill_impl == "triton":
            if meta.prefill_work is None:
                seqs, blocks = self._prefill_work([qsl[i + 1] - qsl[i] for i in range(nd, meta.num_seqs)],
                                                  self._prefill_block_m(q.dtype))
                meta.prefill_work = tuple(torch.tensor(w, dtype=torch.int32).to(q.device, non_blocking=True)
                                          for w in (seqs, blocks))
            block_m = self._prefill_block_m(q.dtype)
            splits = self.prefill_splits(meta.prefill_work[0].shape[0], q.shape[0], block_m)
            self._prefill(q, k, v, k_cache, v_cache, meta.block_tables[nd:], meta.seq_lens[nd:],
                          meta.query_start_loc_device(q.device)[nd:], meta.prefill_work, self.scale, out=out,
                          window=window, attn_limit=meta.attn_limit, softcap=self.softcap, num_splits=splits)
            return out
        lens = meta.seq_lens_host
        for i in range(nd, meta.num_seqs):
            s, e, ctx = qsl[i], qsl[i + 1], lens[i]
            lim = meta.attn_limit[s:e] if meta.attn_limit is not None else None
            if e - s == ctx:
                out[s:e] = attend_one(q[s:e], k[s:e], v[s:e], self.scale, window=window, limit=lim,
                                      softcap=self.softcap)
            else:  # chunk after a cached prefix: gather the visible context from the blocks (device-side table)
                out[s:e] = attend_cached(q[s:e], k_cache, v_cache, meta.block_tables[i], ctx, self.block_size,
                                         self.scale, window=window, limit=lim, softcap=self.softcap)
        return out
