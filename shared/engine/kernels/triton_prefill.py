"""Prefill attention in Triton: every prefill chunk of a step in one launch, over the paged cache.

Sequence s owns query rows [qsl[s], qsl[s+1]) of the flat batch: the last n = qsl[s+1] - qsl[s] of its
ctx = seq_lens[s] tokens. Its keys are
  (a) the cached prefix, tokens [0, ctx - n), read from the paged cache through its block table: every query
      sees all of them, so no mask; in a sliding layer a program starts at the first key its first row can
      see (window.py's rule), so a block behind the window, which may have been given back, is never read;
  (b) the chunk itself, tokens [ctx - n, ctx), read from the step's fresh k / v rows (rotary applied), causal.
One flash-attention pass (online softmax, exp2) covers both, so there is no gather, no dense mask and no
per-shape plan: lengths are read on the device, and the same compiled kernel serves any chunk / context
lengths.

Grid (work item, head, split). A work item is one (sequence, query block) pair from a device-side work list,
so the grid has exactly as many live programs as the step has query blocks, and a CUDA graph can hold a list
of fixed length whose unused entries (sequence -1) exit at once. `prefill_work` builds the list on the host.
With few work items (a short chunk after a long cached prefix) each query block's keys are split over
`num_splits` programs, each keeping its own online softmax, and a second small kernel merges their partial
outputs by their sum-exp (the decode kernel's split-K, by query block).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_attention import NO_WINDOW, tanh_cap

_LOG2E = 1.4426950408889634


@triton.jit
def _online_update(s, nm, m_i, l_i, acc, v, IEEE: tl.constexpr):
    s = tl.where(nm, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays empty
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _scores(q, k, qk_scale, cap_l2, IEEE: tl.constexpr, SOFTCAP: tl.constexpr):
    """q.k scaled into the exp2 domain, tanh-capped when SOFTCAP (cap_l2 = cap * log2(e))."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if SOFTCAP:
        s = tanh_cap(s, cap_l2)
    return s


@triton.jit
def _work_item(work_seq_ptr, work_blk_ptr, qsl_ptr, w):
    """(sequence, query block, first row, chunk length) of work item w; sequence -1: an unused entry."""
    s_idx = tl.load(work_seq_ptr + w)
    live = s_idx >= 0
    q_start = tl.load(qsl_ptr + s_idx, mask=live, other=0)
    n = tl.load(qsl_ptr + s_idx + 1, mask=live, other=0) - q_start
    return s_idx, tl.load(work_blk_ptr + w), q_start, n


@triton.jit
def _block_span(seq_lens_ptr, lim_ptr, s_idx, pid_m, q_start, n, window, BLOCK_M: tl.constexpr,
                HAS_LIM: tl.constexpr):
    """What query block pid_m of sequence s_idx attends: (prefix, lim, a0, a1). Its keys are the absolute
    positions [a0, a1): cached ones below `prefix`, the chunk's from it; lim is each row's last visible key,
    relative to the chunk's first token (query row i sits at i, prefix keys are < 0)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n
    prefix = tl.load(seq_lens_ptr + s_idx) - n
    if HAS_LIM:  # the last key each row may see, as an absolute position
        lim = tl.load(lim_ptr + (q_start + offs_m).to(tl.int64), mask=m_mask, other=0) - prefix
    else:
        lim = offs_m
    first = pid_m * BLOCK_M - window + 1  # the first key any row of this block sees (sliding layers)
    hi = tl.minimum(n, tl.max(tl.where(m_mask, lim, 0), axis=0) + 1)  # chunk keys [.., hi) are ever visible
    return prefix, lim, tl.maximum(prefix + first, 0), prefix + hi


@triton.jit
def _split_size(a0, a1, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, MIN_KEYS: tl.constexpr):
    """(keys per split, splits that get any): NUM_SPLITS equal BLOCK_N-aligned pieces of [a0, a1), none
    shorter than MIN_KEYS, so a short span (a first chunk's early blocks) stays whole in one program."""
    per = tl.maximum(tl.cdiv(tl.cdiv(a1 - a0, NUM_SPLITS), BLOCK_N) * BLOCK_N, MIN_KEYS)
    return per, tl.cdiv(a1 - a0, per)


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
                    work_seq_ptr, work_blk_ptr, out_ptr, part_o_ptr, part_lse_ptr, lim_ptr, qk_scale, window,
                    cap_l2, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_cb, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                    HAS_LIM: tl.constexpr, SOFTCAP: tl.constexpr, NUM_SPLITS: tl.constexpr,
                    MIN_KEYS: tl.constexpr):
    h = tl.program_id(1)
    sp = tl.program_id(2)
    s_idx, pid_m, q_start, n = _work_item(work_seq_ptr, work_blk_ptr, qsl_ptr, tl.program_id(0))
    if s_idx < 0:
        return
    if pid_m * BLOCK_M >= n:
        return
    prefix, lim, a0, a1 = _block_span(seq_lens_ptr, lim_ptr, s_idx, pid_m, q_start, n, window, BLOCK_M, HAS_LIM)
    # Split sp takes the sp-th piece of the block's keys; with one piece it writes the output itself
    if NUM_SPLITS == 1:
        s0 = a0
        s1 = a1
        whole = True
    else:
        per, active = _split_size(a0, a1, NUM_SPLITS, BLOCK_N, MIN_KEYS)
        if sp >= active:
            return
        s0 = a0 + sp * per
        s1 = tl.minimum(s0 + per, a1)
        whole = active == 1
    kvh = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n
    d = tl.arange(0, HEAD_DIM)
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + d[None, :], mask=m_mask[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # (a) the cached prefix, through the block table; every row sees it, within its window
    bt_row = block_tables_ptr + s_idx.to(tl.int64) * stride_bt
    pre_end = tl.minimum(s1, prefix)
    for n0 in range(s0, pre_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nm = offs_n < pre_end
        page = tl.load(bt_row + offs_n // PAGE, mask=nm, other=0).to(tl.int64)
        off = page * stride_cb + (offs_n % PAGE).to(tl.int64) * stride_cs + kvh * stride_ch
        k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=nm[:, None], other=0.0)
        s = _scores(q, k, qk_scale, cap_l2, IEEE, SOFTCAP)
        v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=nm[:, None], other=0.0)
        vis = nm[None, :] & ((offs_n - prefix)[None, :] > offs_m[:, None] - window)
        m_i, l_i, acc = _online_update(s, vis, m_i, l_i, acc, v, IEEE)

    # (b) the chunk itself, from the fresh k / v rows; key j visible to row i when j <= lim[i] (causal: i)
    c_end = s1 - prefix
    for n0 in range(tl.maximum(s0, prefix) - prefix, c_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nm = offs_n < c_end
        krow = (q_start + offs_n).to(tl.int64)
        k = tl.load(k_ptr + krow[:, None] * stride_kt + kvh * stride_kh + d[None, :], mask=nm[:, None], other=0.0)
        s = _scores(q, k, qk_scale, cap_l2, IEEE, SOFTCAP)
        v = tl.load(v_ptr + krow[:, None] * stride_vt + kvh * stride_vh + d[None, :], mask=nm[:, None], other=0.0)
        vis = nm[None, :] & (offs_n[None, :] <= lim[:, None]) & (offs_n[None, :] > offs_m[:, None] - window)
        m_i, l_i, acc = _online_update(s, vis, m_i, l_i, acc, v, IEEE)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if whole:
        tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])
    else:  # this split's normalised partial and its log2-sum-exp2 (-inf: it saw no key), merged by _merge_kernel
        part = (rows * tl.num_programs(1) + h) * NUM_SPLITS + sp
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], o, mask=m_mask[:, None])
        tl.store(part_lse_ptr + part, tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf")),
                 mask=m_mask)


@triton.jit
def _merge_kernel(part_o_ptr, part_lse_ptr, seq_lens_ptr, qsl_ptr, work_seq_ptr, work_blk_ptr, out_ptr, lim_ptr,
                  window, stride_ot, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, MERGE_M: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  SPLITS_PAD: tl.constexpr, MIN_KEYS: tl.constexpr, HAS_LIM: tl.constexpr):
    """MERGE_M rows of one work item's query block, one head: the splits' partials weighted by their sum-exp.
    Grid (work item, head, BLOCK_M // MERGE_M), so the merge reads the partials with many programs at once. A
    block whose keys went to one split was written by it (the same span arithmetic says so here)."""
    h = tl.program_id(1)
    s_idx, pid_m, q_start, n = _work_item(work_seq_ptr, work_blk_ptr, qsl_ptr, tl.program_id(0))
    if s_idx < 0:
        return
    if pid_m * BLOCK_M + tl.program_id(2) * MERGE_M >= n:
        return
    _, _, a0, a1 = _block_span(seq_lens_ptr, lim_ptr, s_idx, pid_m, q_start, n, window, BLOCK_M, HAS_LIM)
    _, active = _split_size(a0, a1, NUM_SPLITS, BLOCK_N, MIN_KEYS)
    if active == 1:
        return
    offs_m = pid_m * BLOCK_M + tl.program_id(2) * MERGE_M + tl.arange(0, MERGE_M)
    m_mask = offs_m < n
    d = tl.arange(0, HEAD_DIM)
    rows = (q_start + offs_m).to(tl.int64)
    base = (rows * tl.num_programs(1) + h) * NUM_SPLITS
    sp = tl.arange(0, SPLITS_PAD)
    lse = tl.load(part_lse_ptr + base[:, None] + sp[None, :], mask=m_mask[:, None] & (sp < active)[None, :],
                  other=float("-inf"))
    m = tl.max(lse, axis=1)
    wt = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m)[:, None])  # (MERGE_M, SPLITS_PAD)
    den = tl.sum(wt, axis=1)
    acc = tl.zeros([MERGE_M, HEAD_DIM], tl.float32)
    for j in tl.static_range(NUM_SPLITS):
        w_j = tl.sum(tl.where(sp[None, :] == j, wt, 0.0), axis=1)
        o = tl.load(part_o_ptr + (base + j)[:, None] * HEAD_DIM + d[None, :], mask=m_mask[:, None] & (j < active),
                    other=0.0)
        acc += o * w_j[:, None]
    res = acc / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :], res.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per dtype; bench/prefill_attn_probe.py --tiles compares others.
TILES = {torch.float32: (32, 32, 4, 2), torch.bfloat16: (64, 64, 4, 2), torch.float16: (64, 64, 4, 2)}


def prefill_block_m(dtype: torch.dtype) -> int:
    """Query rows per program (a work item covers this many rows of one sequence's chunk)."""
    return TILES[dtype][0]


def prefill_work(chunk_lens: list[int], block_m: int) -> tuple[list[int], list[int]]:
    """(sequence index, query block) of every work item, the last (longest-running) blocks first."""
    items = [(i, m) for i, n in enumerate(chunk_lens) for m in range(-(-n // block_m))]
    items.sort(key=lambda it: -it[1])
    return [i for i, _ in items], [m for _, m in items]


def choose_prefill_splits(work_items: int, num_heads: int, num_sms: int, max_splits: int = 8) -> int:
    """Splits of each query block's keys, for a step with few query blocks: a short chunk after a long cached
    prefix (104 new tokens after 896 are 2 blocks x 16 heads = 32 programs for 132 SMs, each walking the whole
    prefix alone) then fills the GPU about once over. 1 when the blocks alone fill half of it: on an H200 the
    partial writes and the merge cost more than the splits save from there on (BENCHMARKS.md, "Prefix caching",
    session 7). A power of two, so few kernel variants exist."""
    programs = max(1, work_items * num_heads)
    if 2 * programs > num_sms:
        return 1
    return min(max_splits, triton.next_power_of_2(-(-num_sms // programs)))


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                      query_start_loc: torch.Tensor, work: tuple[torch.Tensor, torch.Tensor], scale: float,
                      out: torch.Tensor | None = None,
                      tile: tuple[int, int, int, int] | None = None, *, window: int | None = None,
                      attn_limit: torch.Tensor | None = None, softcap: float | None = None,
                      num_splits: int = 1, split_min_keys: int | None = None) -> torch.Tensor:
    """Causal attention of S prefill chunks packed in q (T, H, D).

    k, v (T, KVH, D): this step's rotated keys / values, rows aligned with q (unit stride on D; other strides
    free). Caches (num_blocks, page, KVH, D) hold each sequence's cached prefix. block_tables (S, W) int32,
    seq_lens (S,) int32 (prefix + chunk), query_start_loc (S + 1,) int32 with row offsets into q / k / v / out
    (need not start at 0). work: two (N,) int32 device tensors, sequence index and query block of each work
    item (`prefill_work` with `prefill_block_m(q.dtype)`, or with tile[0] when `tile` overrides TILES;
    sequence -1: nothing to do). `window`: a sliding layer's window; `attn_limit` (T,) int32: the last key
    position each row may see (attention/base.py); `softcap`: tanh cap on the scaled scores. `num_splits` > 1
    splits each query block's keys over that many programs and merges their partials in a second launch
    (`choose_prefill_splits`); the result is the same to rounding. No split takes fewer than `split_min_keys`
    keys (default 2 x BLOCK_N), so a block with a short span (no cached prefix) stays in one program, which
    writes its output itself.
    Returns out (T, H, D): only the rows of the chunks are written."""
    T, H, D = q.shape
    KVH = k.shape[1]
    out = torch.empty_like(q) if out is None else out
    work_seq, work_blk = work
    if work_seq.shape[0] == 0:
        return out
    ieee = q.dtype == torch.float32
    block_m, block_n, warps, stages = tile or TILES[q.dtype]
    if num_splits > 1:  # indexed by absolute row, like out: rows outside the work list are never read
        part_o = torch.empty(T, H, num_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(T, H, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    lim = attn_limit if attn_limit is not None else seq_lens  # unused without a limit
    win = NO_WINDOW if window is None else int(window)
    min_keys = split_min_keys or 2 * block_n
    _prefill_kernel[(work_seq.shape[0], H, num_splits)](
        q, k, v, k_cache, v_cache, block_tables, seq_lens, query_start_loc, work_seq, work_blk, out,
        part_o, part_lse, lim, scale * _LOG2E, win, float(softcap or 1.0) * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=H // KVH, HEAD_DIM=D, PAGE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee,
        HAS_LIM=attn_limit is not None, SOFTCAP=softcap is not None, NUM_SPLITS=num_splits,
        MIN_KEYS=min_keys, num_warps=warps, num_stages=stages)
    if num_splits > 1:
        merge_m = min(16, block_m)
        _merge_kernel[(work_seq.shape[0], H, block_m // merge_m)](
            part_o, part_lse, seq_lens, query_start_loc, work_seq, work_blk, out, lim, win,
            out.stride(0), out.stride(1), HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, MERGE_M=merge_m,
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), MIN_KEYS=min_keys,
            HAS_LIM=attn_limit is not None, num_warps=4)
    return out
