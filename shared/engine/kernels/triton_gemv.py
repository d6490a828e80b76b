"""Skinny GEMM (batch <= 16 rows) in Triton for decode projections: out (M, N) = x (M, K) @ W (N, K)^T (+ bias).

At batch 1 cuBLAS picks tiles that read the small q/k/v and o_proj weights (8-10 MB) at only ~50% of the
copy bandwidth. Here each program owns BLOCK_N output columns and streams its W rows once over the whole K
(pipelined loads, fp32 accumulation, tl.dot on a 16-row padded x), so the grid is N / BLOCK_N programs with
no split-K reduction pass.

Not on the engine's path: cuBLAS was as fast or faster for q/k/v, o_proj and down_proj at every batch measured
(bench/engine_gemv_probe.py), and the MLP's gate/up runs through triton_gemm's short-step GEMM from one row
(it replaced this module's fused gate/up GEMV, being 1-2% faster on whole decode steps at batch 1-8:
BENCHMARKS.md, "Prefix caching", session 9). Kept as the measured alternative for the probes, and for
`_dot_acc`, which triton_gemm shares.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot_acc(acc, x, w, IEEE: tl.constexpr):
    """acc + x @ w^T, fp32 products exact in fp32 models (tf32 otherwise would change the numerics)."""
    if IEEE:
        return acc + tl.dot(x, tl.trans(w), input_precision="ieee")
    return acc + tl.dot(x, tl.trans(w))


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   IEEE: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    nm = rn < N
    mm = rm < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    for k0 in range(0, K, BLOCK_K):
        km = (k0 + rk) < K
        w = tl.load(w_ptrs + k0, mask=nm[:, None] & km[None, :], other=0.0)
        x = tl.load(x_ptrs + k0, mask=mm[:, None] & km[None, :], other=0.0)
        acc = _dot_acc(acc, x, w, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


def skinny_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, block_n: int = 16,
                  block_k: int = 256, num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """x (M, K) with M <= 16 and unit stride on K; w (N, K) contiguous; returns (M, N) in x's dtype."""
    M, K = x.shape
    N = w.shape[0]
    assert M <= 16 and x.stride(-1) == 1 and w.is_contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    _skinny_kernel[(triton.cdiv(N, block_n),)](
        x, w, b if b is not None else w, out, M, N, K, x.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=b is not None, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)
    return out
