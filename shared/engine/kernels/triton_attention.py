"""Paged decode attention in Triton: one query token per sequence against its K/V in the block cache.

Grid (sequence, kv_head, split): each program takes the query heads that share one KV head (GQA packing:
the group is one matrix tile, padded to 16 rows for tl.dot) and one split of the sequence's context; the
split size is computed on the device from the sequence length, so the same launch serves any lengths (and
a CUDA graph). Each split keeps an online softmax; a second kernel merges the splits by their
log-sum-exp. Length-0 rows (CUDA-graph padding) produce zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
                         part_o_ptr, part_lse_ptr, scale,
                         stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
                         stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         IEEE: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = sp * per_split
    end = tl.minimum(start + per_split, seq_len)

    g = tl.arange(0, GROUP_PAD)
    gm = g < GROUP
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gm[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < end
        page = tl.load(bt_row + n // PAGE, mask=nm, other=0).to(tl.int64)
        off = page * stride_kb + (n % PAGE).to(tl.int64) * stride_ks + kvh * stride_kh
        k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=nm[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(nm[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=nm[:, None], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=gm[:, None])
    else:
        lse = tl.where(l_i > 0, m_i + tl.log(safe_l), float("-inf"))
        tl.store(part_o_ptr + b.to(tl.int64) * stride_pb + heads[:, None] * stride_ph + sp * stride_ps + d[None, :],
                 o, mask=gm[:, None])
        tl.store(part_lse_ptr + b.to(tl.int64) * stride_lb + heads * stride_lh + sp, lse, mask=gm)


@triton.jit
def _merge_splits_kernel(part_o_ptr, part_lse_ptr, out_ptr, stride_pb, stride_ph, stride_ps,
                         stride_lb, stride_lh, stride_ob, stride_oh,
                         NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    sm = s < NUM_SPLITS
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + b * stride_lb + h * stride_lh + s, mask=sm, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)
    o = tl.load(part_o_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                mask=sm[:, None], other=0.0)
    den = tl.sum(w, axis=0)
    res = tl.sum(o * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, res.to(out_ptr.dtype.element_ty))


def choose_num_splits(num_seqs: int, num_kv_heads: int, num_sms: int, max_splits: int = 32) -> int:
    """Enough programs to fill the GPU about twice over; a power of two, so few kernel variants exist."""
    want = max(1, -(-2 * num_sms // max(1, num_seqs * num_kv_heads)))
    return min(max_splits, triton.next_power_of_2(want))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, num_splits: int, out: torch.Tensor | None = None,
                 block_n: int = 64) -> torch.Tensor:
    """q (B, H, D); caches (num_blocks, page, KVH, D); block_tables (B, W) int32; seq_lens (B,) int32."""
    B, H, D = q.shape
    page, KVH = k_cache.shape[1], k_cache.shape[2]
    group = H // KVH
    out = torch.empty_like(q) if out is None else out
    if B == 0:
        return out
    if num_splits > 1:
        part_o = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    _paged_decode_kernel[(B, KVH, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_o, part_lse, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        part_o.stride(0) if num_splits > 1 else 0, part_o.stride(1) if num_splits > 1 else 0,
        part_o.stride(2) if num_splits > 1 else 0,
        part_lse.stride(0) if num_splits > 1 else 0, part_lse.stride(1) if num_splits > 1 else 0,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, PAGE=page,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2)
    if num_splits > 1:
        _merge_splits_kernel[(B, H)](
            part_o, part_lse, out, part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), HEAD_DIM=D, num_warps=1)
    return out
