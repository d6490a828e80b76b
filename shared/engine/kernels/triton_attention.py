"""Paged decode attention in Triton: one query token per sequence against its K/V in the block cache.

Grid (sequence, kv_head, split): each program takes the query heads that share one KV head (GQA packing:
the group is one matrix tile, padded to 16 rows for tl.dot) and one split of the sequence's context; the
split size is computed on the device from the sequence length, so the same launch serves any lengths (and
a CUDA graph). Each split keeps an online softmax and stores its partial output and log-sum-exp. A sliding
layer passes its window W: the splits then cover only the last W keys (the blocks before them are never
read). `softcap` caps the scores by tanh (Gemma 2 style).

The splits are merged by their log-sum-exp, by default in a second small kernel. `fused_merge=True` merges them
in the same launch instead: after storing its partials, a program bumps
a per-(sequence, kv_head) int32 counter (atomic, acq_rel, after a CTA barrier so all its threads' stores are
ordered before it); the program that sees NUM_SPLITS - 1 is the last, reads every split's partials (L2 loads,
not L1) for its GROUP heads, writes the output and sets the counter back to 0. The counters live in one
zeroed buffer per device that every call reuses, so no memset per call or per CUDA-graph replay; calls on one
device must therefore not run concurrently on different streams. Measured on an H100 (bench/decode_fusion_probe.py,
batch 1, 32 splits, 1,000-token context) the fused merge is slower, 8.5 against 6.1 us a layer: the last
program's serial read of every split's partials costs more than the launch it saves, so it is off by default
and kept for A/B runs at other shapes. Length-0 rows (CUDA-graph padding) produce zeros on both paths.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# window of a global layer: larger than any context
NO_WINDOW = 1 << 30


@triton.jit
def tanh_cap(x, cap):
    """cap * tanh(x / cap), from exp (no tanh intrinsic on every backend, the interpreter included)."""
    y = x / cap
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(y >= 0, t, -t)


@triton.jit
def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
                         part_o_ptr, part_lse_ptr, counter_ptr, scale, window, softcap,
                         stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
                         stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         FUSED_MERGE: tl.constexpr, MERGE_ROWS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                         SPLIT_CHUNK: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    lo = tl.maximum(seq_len - window, 0)  # the query sits at seq_len - 1 and sees (seq_len - 1 - window, ...]
    span = seq_len - lo
    per_split = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + sp * per_split
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
        s = s * scale
        if SOFTCAP:
            s = tanh_cap(s, softcap)
        s = tl.where(nm[None, :], s, float("-inf"))
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
        if FUSED_MERGE:
            tl.debug_barrier()  # every thread's partial stores happen before the release below
            cnt = counter_ptr + b * tl.num_programs(1) + kvh
            if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
                # The last split of this (sequence, kv_head): after the acquire the other programs' partials
                # are visible; ".cg" loads them from L2, past any stale L1 line. Same math as
                # _merge_splits_kernel, with all LSEs in one load and the outputs in (GROUP, SPLIT_CHUNK, D)
                # tiles whose loads do not wait on each other; splits past the context (LSE -inf, output 0,
                # weight 0) are not read.
                r = tl.arange(0, MERGE_ROWS)
                rm = r < GROUP
                rh = kvh * GROUP + r
                js = tl.arange(0, SPLITS_PAD)
                lse_row = part_lse_ptr + b.to(tl.int64) * stride_lb + rh * stride_lh
                lse_all = tl.load(lse_row[:, None] + js[None, :], mask=rm[:, None] & (js < NUM_SPLITS)[None, :],
                                  other=float("-inf"), cache_modifier=".cg")
                m = tl.max(lse_all, axis=1)
                m = tl.where(m == float("-inf"), 0.0, m)
                den = tl.sum(tl.exp(lse_all - m[:, None]), axis=1)
                n_active = tl.cdiv(span, tl.maximum(per_split, 1))
                o_row = part_o_ptr + b.to(tl.int64) * stride_pb + rh * stride_ph
                c = tl.arange(0, SPLIT_CHUNK)
                res = tl.zeros([MERGE_ROWS, HEAD_DIM], tl.float32)
                for j0 in tl.static_range(0, SPLITS_PAD, SPLIT_CHUNK):
                    jc = j0 + c
                    cm = rm[:, None] & (jc < NUM_SPLITS)[None, :]
                    w = tl.exp(tl.load(lse_row[:, None] + jc[None, :], mask=cm, other=float("-inf"),
                                       cache_modifier=".cg") - m[:, None])
                    om = (cm & (jc < n_active)[None, :])[:, :, None]
                    o_c = tl.load(o_row[:, None, None] + jc[None, :, None] * stride_ps + d[None, None, :], mask=om,
                                  other=0.0, cache_modifier=".cg")
                    res += tl.sum(o_c * w[:, :, None], axis=1)
                res = res / tl.where(den > 0, den, 1.0)[:, None]
                tl.store(out_ptr + b.to(tl.int64) * stride_ob + rh[:, None] * stride_oh + d[None, :],
                         res.to(out_ptr.dtype.element_ty), mask=rm[:, None])
                tl.store(cnt, 0)  # every split has counted: ready for the next launch (or graph replay)


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


# Elements of one partial-output tile the fused merge loads at a time (32 fp32 registers a thread at 4 warps).
_MERGE_TILE = 4096
_counters: dict[torch.device, list[torch.Tensor]] = {}  # per device: every buffer made, the newest last


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """The device's zeroed int32 counter buffer of the fused split merge, at least `n` entries (grown to a power
    of two, at least 1024). The kernel leaves it zeroed, so it is allocated once and shared by all calls; a
    grown-out buffer is kept, since a CUDA graph captured with it still uses it.

    Growing it means a memset, which a CUDA-graph capture would record instead of running: the first call at
    the largest size must run eagerly (the engine's warm-up does), otherwise this raises during capture."""
    bufs = _counters.setdefault(device, [])
    if not bufs or bufs[-1].numel() < n:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"paged_decode split counters need {n} entries during CUDA-graph capture; "
                               "call it once eagerly at this batch size before capturing")
        bufs.append(torch.zeros(max(1024, triton.next_power_of_2(n)), dtype=torch.int32, device=device))
    return bufs[-1]


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, num_splits: int, out: torch.Tensor | None = None,
                 block_n: int = 64, fused_merge: bool = False, window: int | None = None,
                 softcap: float | None = None) -> torch.Tensor:
    """q (B, H, D); caches (num_blocks, page, KVH, D); block_tables (B, W) int32; seq_lens (B,) int32.

    fused_merge=False merges the splits with a second kernel instead of in the decode kernel. `window`: only
    the last `window` keys are attended (a sliding layer); `softcap`: tanh cap on the scaled scores."""
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
    fused = fused_merge and num_splits > 1
    merge_rows, splits_pad = triton.next_power_of_2(group), triton.next_power_of_2(num_splits)
    counters = split_counters(q.device, B * KVH) if fused else seq_lens  # unused unless fused
    _paged_decode_kernel[(B, KVH, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_o, part_lse, counters, scale,
        NO_WINDOW if window is None else int(window), float(softcap or 1.0),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        part_o.stride(0) if num_splits > 1 else 0, part_o.stride(1) if num_splits > 1 else 0,
        part_o.stride(2) if num_splits > 1 else 0,
        part_lse.stride(0) if num_splits > 1 else 0, part_lse.stride(1) if num_splits > 1 else 0,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, PAGE=page,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, FUSED_MERGE=fused, MERGE_ROWS=merge_rows, SPLITS_PAD=splits_pad,
        SPLIT_CHUNK=min(splits_pad, max(1, _MERGE_TILE // (merge_rows * D))), IEEE=q.dtype == torch.float32,
        SOFTCAP=softcap is not None, num_warps=4, num_stages=2)
    if num_splits > 1 and not fused:
        _merge_splits_kernel[(B, H)](
            part_o, part_lse, out, part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), HEAD_DIM=D, num_warps=1)
    return out
