"""Skinny GEMM (batch <= 16 rows) in Triton for decode projections: out (M, N) = x (M, K) @ W (N, K)^T (+ bias).

At batch 1 cuBLAS picks tiles that read the small q/k/v and o_proj weights (8-10 MB) at only ~50% of the
copy bandwidth. Here each program owns BLOCK_N output columns and streams its W rows once over the whole K
(pipelined loads, fp32 accumulation, tl.dot on a 16-row padded x), so the grid is N / BLOCK_N programs with
no split-K reduction pass.

skinny_gate_up_silu is the MLP's first half in one launch: over the packed (2*I, K) gate/up weight, each
program streams the gate tile and the matching up tile of its BLOCK_N columns over K and writes
silu(gate) * up, rounded as the unfused path (skinny_linear, then triton_fused.silu_mul) rounds: gate and up
to the model dtype, silu(gate) to the dtype, then the product. No (M, 2*I) intermediate, no second kernel.
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
def _gated(g, u, dt: tl.constexpr):
    """silu(g) * u with the unfused path's roundings (g, u rounded to dt; silu(g) rounded; the product)."""
    g = g.to(dt).to(tl.float32)
    a = (g * tl.sigmoid(g)).to(dt)
    return (a.to(tl.float32) * u.to(dt).to(tl.float32)).to(dt)


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


@triton.jit
def _skinny_gate_up_silu_kernel(x_ptr, w_ptr, out_ptr, M, I, K, stride_xm, stride_wn, stride_om,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                IEEE: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    nm = rn < I
    mm = rm < M
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    g_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    u_ptrs = w_ptr + (rn + I)[:, None].to(tl.int64) * stride_wn + rk[None, :]  # up_proj rows follow gate_proj's
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    for k0 in range(0, K, BLOCK_K):
        km = (k0 + rk) < K
        wm = nm[:, None] & km[None, :]
        wg = tl.load(g_ptrs + k0, mask=wm, other=0.0)
        wu = tl.load(u_ptrs + k0, mask=wm, other=0.0)
        x = tl.load(x_ptrs + k0, mask=mm[:, None] & km[None, :], other=0.0)
        acc_g = _dot_acc(acc_g, x, wg, IEEE)
        acc_u = _dot_acc(acc_u, x, wu, IEEE)
    o = _gated(acc_g, acc_u, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], o, mask=mm[:, None] & nm[None, :])


def skinny_gate_up_silu(x: torch.Tensor, w_gate_up: torch.Tensor, block_n: int = 32, block_k: int = 128,
                        num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """silu(x @ Wg^T) * (x @ Wu^T) for w_gate_up = cat([Wg, Wu]) of shape (2*I, K), contiguous; x (M, K) with
    M <= 16 and unit stride on K. Returns (M, I) in x's dtype.

    The default tile streams 2 x 32 rows per step: the bytes per pipeline stage and the number of programs of
    skinny_linear at block_n=64 over the whole (2*I, K) weight, and about its registers (Triton 3.8, sm_90,
    bf16: 242 vs 247, no spills; block_n=64 here spills)."""
    M, K = x.shape
    I2 = w_gate_up.shape[0]
    assert M <= 16 and x.stride(-1) == 1 and w_gate_up.is_contiguous() and I2 % 2 == 0 and w_gate_up.shape[1] == K
    inter = I2 // 2
    out = torch.empty(M, inter, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    _skinny_gate_up_silu_kernel[(triton.cdiv(inter, block_n),)](
        x, w_gate_up, out, M, inter, K, x.stride(0), w_gate_up.stride(0), out.stride(0),
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)
    return out
