"""Reference attention in plain torch: per sequence, gather its K/V from the paged cache and run SDPA (GQA
native, causal with the cached prefix as offset). Also the reference KV write (index_copy into the slots).
Runs anywhere; CI tests the engine with it and the GPU kernels are checked against it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionBackend, AttentionMetadata


def write_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    kc = k_cache.view(-1, *k_cache.shape[2:])
    vc = v_cache.view(-1, *v_cache.shape[2:])
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):  # padded rows write nothing
        slots, k, v = slots[keep], k[keep], v[keep]
    kc.index_copy_(0, slots, k)
    vc.index_copy_(0, slots, v)


def gather_kv(cache: torch.Tensor, blocks: list[int], n: int) -> torch.Tensor:
    """(n, KVH, D) of one sequence, in token order, from its block list."""
    idx = torch.as_tensor(blocks, device=cache.device, dtype=torch.long)
    return cache.index_select(0, idx).flatten(0, 1)[:n]


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q (n, H, D) = the last n of the ctx tokens whose k, v are (ctx, KVH, D); causal. Returns (n, H, D)."""
    n, ctx = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    if n == ctx:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    elif n == 1:
        o = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=True)
    else:  # chunk after a cached prefix: query j sits at ctx - n + j (SDPA's is_causal is top-left aligned)
        rows = torch.arange(ctx - n, ctx, device=q.device).unsqueeze(1)
        mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= rows
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.squeeze(0).transpose(0, 1)


class TorchRefBackend(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # q may be a strided view
        qsl, lens, bts = meta.query_start_loc_host, meta.seq_lens_host, meta.block_tables_host
        bs = self.block_size
        for i in range(meta.num_seqs):
            s, e, ctx = qsl[i], qsl[i + 1], lens[i]
            if e == s:
                continue
            if e - s == ctx:  # whole sequence in this chunk: its K/V are the fresh ones
                kk, vv = k[s:e], v[s:e]
            else:
                blocks = bts[i][: -(-ctx // bs)]
                kk, vv = gather_kv(k_cache, blocks, ctx), gather_kv(v_cache, blocks, ctx)
            out[s:e] = attend_one(q[s:e], kk, vv, self.scale)
        return out
