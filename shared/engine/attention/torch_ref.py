"""Reference attention in plain torch: per sequence, gather its K/V from the paged cache and run SDPA (GQA
native, causal with the cached prefix as offset). Also the reference KV write (index_copy into the slots).
Runs anywhere; CI tests the engine with it and the GPU kernels are checked against it.

A windowed layer gathers from the first block its query rows can see (window.py's `first_visible_block`), not
from block 0: blocks behind the window may have been given back (their table entries are `FREED_BLOCK`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..window import cdiv, first_visible_block
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


def gather_kv(cache: torch.Tensor, blocks: list[int] | torch.Tensor, n: int) -> torch.Tensor:
    """(n, KVH, D) of one sequence, in token order, from its block list (or a part of it)."""
    idx = torch.as_tensor(blocks, device=cache.device, dtype=torch.long)
    return cache.index_select(0, idx).flatten(0, 1)[:n]


def visible_mask(n: int, ctx: int, device: torch.device, window: int | None = None,
                 limit: torch.Tensor | None = None) -> torch.Tensor:
    """(n, ctx) bool: query j (position ctx - n + j) sees key i when i <= limit[j] (default: its position) and,
    with a window W, i > position - W (transformers' sliding mask AND (causal OR same multimodal run))."""
    pos = torch.arange(ctx - n, ctx, device=device).unsqueeze(1)
    keys = torch.arange(ctx, device=device).unsqueeze(0)
    lim = pos if limit is None else limit.to(device=device, dtype=torch.long).reshape(n, 1)
    mask = keys <= lim
    if window is not None:
        mask &= keys > pos - window
    return mask


def attend_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor,
                  softcap: float | None = None) -> torch.Tensor:
    """q (n, H, D), k, v (ctx, KVH, D), mask (n, ctx) bool. Returns (n, H, D). With `softcap` the scores are
    capped by tanh (eager math: SDPA has no cap), as transformers' eager attention does."""
    qh, kh, vh = q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    if softcap is None:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)
    rep = q.shape[1] // k.shape[1]
    kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
    s = torch.matmul(qh, kh.transpose(2, 3)) * scale
    s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, vh).squeeze(0).transpose(0, 1)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, window: int | None = None,
               limit: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """q (n, H, D) = the last n of the ctx tokens whose k, v are (ctx, KVH, D); causal, or the mask of
    `visible_mask` when a window or limits are given. Returns (n, H, D)."""
    n, ctx = q.shape[0], k.shape[0]
    if window is not None and window >= ctx:
        window = None  # every key is inside the window
    if window is not None or limit is not None or softcap is not None:
        return attend_masked(q, k, v, scale, visible_mask(n, ctx, q.device, window, limit), softcap)
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


def attend_cached(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks, ctx: int,
                  block_size: int, scale: float, *, window: int | None = None, limit: torch.Tensor | None = None,
                  softcap: float | None = None) -> torch.Tensor:
    """q (n, H, D): the last n of a sequence's `ctx` tokens, whose K/V are in the caches through `blocks` (its
    block table: a host list or a device row). Only the blocks from the first one the rows can see are
    gathered, and positions shift by that block's first key (the mask is translation-invariant; `limit`, in
    absolute positions, shifts with them). Returns (n, H, D)."""
    first = first_visible_block(ctx - q.shape[0], window, block_size)
    off = first * block_size
    part = blocks[first:cdiv(ctx, block_size)]
    kk, vv = gather_kv(k_cache, part, ctx - off), gather_kv(v_cache, part, ctx - off)
    lim = None if limit is None or off == 0 else limit - off
    return attend_one(q, kk, vv, scale, window=window, limit=lim, softcap=softcap)


class TorchRefBackend(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, window: int | None = None) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # q may be a strided view
        qsl, lens, bts = meta.query_start_loc_host, meta.seq_lens_host, meta.block_tables_host
        for i in range(meta.num_seqs):
            s, e, ctx = qsl[i], qsl[i + 1], lens[i]
            if e == s:
                continue
            lim = meta.attn_limit[s:e] if meta.attn_limit is not None and i >= meta.num_decodes else None
            if e - s == ctx:  # whole sequence in this chunk: its K/V are the fresh ones
                out[s:e] = attend_one(q[s:e], k[s:e], v[s:e], self.scale, window=window, limit=lim,
                                      softcap=self.softcap)
            else:
                out[s:e] = attend_cached(q[s:e], k_cache, v_cache, bts[i], ctx, self.block_size, self.scale,
                                         window=window, limit=lim, softcap=self.softcap)
        return out
