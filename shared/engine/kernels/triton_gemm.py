"""Short-step GEMM (1-128 rows) in Triton: out (M, N) = x (M, K) @ W (N, K)^T (+ bias), and the MLP's packed
gate/up projection with silu(gate) * up in its epilogue.

A step of a few dozen rows or fewer (a decode batch of 1-64, a small mixed step) is weight-read-bound: every
weight byte is read once and the rows hardly matter. The engine runs the gate/up variant from 1 to 64 rows
(triton_ops.TritonOps.short_gemm_max_rows), where it is 8-13% faster than cuBLAS's GEMM plus the separate
silu_mul kernel on an H200 (and at 1-8 rows a little faster than the fused GEMV it replaced); at 96 rows it is
even and at 128 cuBLAS wins, as it does for q/k/v, o_proj and down_proj at every size measured (BENCHMARKS.md,
"Prefix caching", sessions 8 and 9). Here one program holds all
M rows (BLOCK_M >= M, so each weight tile is read once) and BLOCK_N columns over a contiguous K range:
- grid (cdiv(N, BLOCK_N), SPLIT_K): SPLIT_K > 1 cuts K into equal ranges of whole BLOCK_K tiles, so narrow
  weights are streamed by enough programs to fill the GPU;
- SPLIT_K == 1: the program applies the epilogue (bias, or silu(gate) * up) and writes the output;
- SPLIT_K > 1: each program writes its fp32 partial (SPLIT_K, M, N) and `_reduce_kernel` sums the partials in
  split order (deterministic: no atomics) and applies the epilogue.
Rounding is the unfused path's: accumulation in fp32, bias added in fp32, then one rounding to the model
dtype; for gate/up, gate and up rounded to the dtype, silu(gate) rounded, then the product (as
triton_fused.silu_mul over a rounded F.linear output). fp32 models use exact fp32 products (no tf32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_gemv import _dot_acc

MAX_ROWS = 128


@triton.jit
def _gated(g, u, dt: tl.constexpr):
    """silu(g) * u with the unfused path's roundings (g, u rounded to dt; silu(g) rounded; the product)."""
    g = g.to(dt).to(tl.float32)
    a = (g * tl.sigmoid(g)).to(dt)
    return (a.to(tl.float32) * u.to(dt).to(tl.float32)).to(dt)


@dataclass(frozen=True)
class GemmTile:
    """One launch shape: columns and K per tile, K ranges (SPLIT_K), warps and pipeline stages."""
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, M, N, K, k_split, stride_xm, stride_wn, stride_om,
                 HAS_BIAS: tl.constexpr, GATED: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """GATED: w is (2N, K), gate rows then up rows, and the output is (M, N). SPLIT: write fp32 partials
    part[pid_k] (M, N), or (M, 2N) when GATED (gate columns, then up), instead of the output."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    nm = rn < N
    mm = rm < M
    k0 = pid_k * k_split
    k1 = tl.minimum(K, k0 + k_split)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    u_off = N.to(tl.int64) * stride_wn
    for k in range(k0, k1, BLOCK_K):
        km = (k + rk) < k1
        wmask = nm[:, None] & km[None, :]
        x = tl.load(x_ptrs + k, mask=mm[:, None] & km[None, :], other=0.0)
        acc = _dot_acc(acc, x, tl.load(w_ptrs + k, mask=wmask, other=0.0), IEEE)
        if GATED:
            acc_u = _dot_acc(acc_u, x, tl.load(w_ptrs + u_off + k, mask=wmask, other=0.0), IEEE)
    omask = mm[:, None] & nm[None, :]
    if SPLIT:
        width = 2 * N if GATED else N
        p = part_ptr + pid_k.to(tl.int64) * M * width + rm[:, None] * width + rn[None, :]
        tl.store(p, acc, mask=omask)
        if GATED:
            tl.store(p + N, acc_u, mask=omask)
    else:
        o = out_ptr + rm[:, None] * stride_om + rn[None, :]
        if GATED:
            tl.store(o, _gated(acc, acc_u, out_ptr.dtype.element_ty), mask=omask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
            tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _reduce_kernel(part_ptr, b_ptr, out_ptr, M, N, stride_om, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                   GATED: tl.constexpr, BLOCK: tl.constexpr):
    """out = epilogue(sum of the SPLITS partials, in split order) over BLOCK outputs a program."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < M * N
    row = i // N
    col = i % N
    width = 2 * N if GATED else N
    src = row * width + col
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        base = part_ptr + s * M * width
        acc += tl.load(base + src, mask=mask, other=0.0)
        if GATED:
            acc_u += tl.load(base + src + N, mask=mask, other=0.0)
    dt = out_ptr.dtype.element_ty
    if GATED:
        o = _gated(acc, acc_u, dt)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + col, mask=mask, other=0.0).to(tl.float32)
        o = acc.to(dt)
    tl.store(out_ptr + row * stride_om + col, o, mask=mask)


def _launch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, n: int, gated: bool,
            tile: GemmTile) -> torch.Tensor:
    M, K = x.shape
    assert M <= MAX_ROWS and x.stride(-1) == 1 and w.is_contiguous() and w.shape[1] == K
    out = torch.empty(M, n, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    block_m = max(16, triton.next_power_of_2(M))
    split = max(1, min(tile.split_k, triton.cdiv(K, tile.block_k)))
    k_split = triton.cdiv(triton.cdiv(K, split), tile.block_k) * tile.block_k  # whole tiles per range
    split = triton.cdiv(K, k_split)
    part = (torch.empty(split, M, 2 * n if gated else n, dtype=torch.float32, device=x.device)
            if split > 1 else out)
    _gemm_kernel[(triton.cdiv(n, tile.block_n), split)](
        x, w, b if b is not None else w, out, part, M, n, K, k_split, x.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=b is not None, GATED=gated, SPLIT=split > 1, BLOCK_M=block_m, BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, IEEE=x.dtype == torch.float32, num_warps=tile.num_warps,
        num_stages=tile.num_stages)
    if split > 1:
        block = 1024
        _reduce_kernel[(triton.cdiv(M * n, block),)](
            part, b if b is not None else part, out, M, n, out.stride(0), SPLITS=split, HAS_BIAS=b is not None,
            GATED=gated, BLOCK=block, num_warps=4)
    return out


def short_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                 tile: GemmTile = GemmTile()) -> torch.Tensor:
    """x (M, K), M <= 128, unit stride on K; w (N, K) contiguous; returns (M, N) in x's dtype."""
    return _launch(x, w, b, w.shape[0], False, tile)


def short_gate_up_silu(x: torch.Tensor, w_gate_up: torch.Tensor, tile: GemmTile = GemmTile()) -> torch.Tensor:
    """silu(x @ Wg^T) * (x @ Wu^T) for w_gate_up = cat([Wg, Wu]) of shape (2*I, K); returns (M, I)."""
    assert w_gate_up.shape[0] % 2 == 0
    return _launch(x, w_gate_up, None, w_gate_up.shape[0] // 2, True, tile)
