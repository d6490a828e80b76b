"""Fused elementwise kernels of the decoder on CUDA, one launch each where HF does several:

- add_rmsnorm: residual += x, then RMSNorm(residual) * weight (HF rounding: the residual and the normalised
  value are rounded to the model dtype before the weight multiply, as LlamaRMSNorm / Qwen2RMSNorm do; with
  unit_offset, Gemma's: normalised in fp32, times (1 + weight), rounded once);
- silu_mul: silu(gate) * up;
- rope_and_cache: HF's rotate-half RoPE on q and k with the cos/sin tables from the model's own rotary_emb
  (M-RoPE sections already folded into them), then k and v written into their paged-cache slots (slot < 0:
  padding, nothing written).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps, stride_x, stride_r, stride_o,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr, UNIT_OFFSET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)  # the residual, rounded as HF's `a + b`
        tl.store(res_ptr + row * stride_r + cols, x, mask=m)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    w = tl.load(w_ptr + cols, mask=m, other=0.0)
    if UNIT_OFFSET:
        y = xf * tl.rsqrt(var + eps) * (1.0 + w.to(tl.float32))
        tl.store(out_ptr + row * stride_o + cols, y.to(x.dtype), mask=m)
    else:
        y = (xf * tl.rsqrt(var + eps)).to(x.dtype)
        tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype), mask=m)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                unit_offset: bool = False):
    """Returns (norm(residual + x) * weight, residual + x); the residual is updated in place when given.
    unit_offset: Gemma's norm, * (1 + weight)."""
    out = torch.empty_like(x)
    n = x.shape[-1]
    block = triton.next_power_of_2(n)
    _add_rmsnorm_kernel[(x.shape[0],)](
        x, residual if residual is not None else x, weight, out, n, eps, x.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0),
        HAS_RES=residual is not None, BLOCK=block, UNIT_OFFSET=unit_offset, num_warps=8 if block >= 2048 else 4)
    return out, (residual if residual is not None else x)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, n_cols, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=m, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=m, other=0.0)
    gf = g.to(tl.float32)
    a = (gf * tl.sigmoid(gf)).to(g.dtype)
    tl.store(o_ptr + row * stride_o + cols, (a.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    n = gate.shape[-1]
    block = min(2048, triton.next_power_of_2(n))
    _silu_mul_kernel[(gate.shape[0], triton.cdiv(n, block))](gate, up, out, n, gate.stride(0), up.stride(0),
                                                             out.stride(0), BLOCK=block, num_warps=4)
    return out


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                       stride_cslot, stride_ch,
                       H: tl.constexpr, KVH: tl.constexpr, HP: tl.constexpr, KVHP: tl.constexpr,
                       HALF: tl.constexpr, HALFP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALFP)
    dm = d < HALF
    c1 = tl.load(cos_ptr + t * stride_ct + d, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + d, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_ct + d, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_ct + HALF + d, mask=dm, other=0.0).to(tl.float32)
    # q: x*cos + rotate_half(x)*sin with rotate_half(x) = (-x2, x1)
    hq = tl.arange(0, HP)
    mq = (hq < H)[:, None] & dm[None, :]
    qp = q_ptr + t * stride_qt + hq[:, None] * stride_qh + d[None, :]
    x1 = tl.load(qp, mask=mq, other=0.0)
    x2 = tl.load(qp + HALF, mask=mq, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(qp, (x1f * c1[None, :] - x2f * s1[None, :]).to(x1.dtype), mask=mq)
    tl.store(qp + HALF, (x2f * c2[None, :] + x1f * s2[None, :]).to(x1.dtype), mask=mq)
    # k: same rotation, kept in place (prefill attends to the fresh k) and written to the cache
    hk = tl.arange(0, KVHP)
    mk = (hk < KVH)[:, None] & dm[None, :]
    kp = k_ptr + t * stride_kt + hk[:, None] * stride_kh + d[None, :]
    y1 = tl.load(kp, mask=mk, other=0.0)
    y2 = tl.load(kp + HALF, mask=mk, other=0.0)
    y1f, y2f = y1.to(tl.float32), y2.to(tl.float32)
    k1 = (y1f * c1[None, :] - y2f * s1[None, :]).to(y1.dtype)
    k2 = (y2f * c2[None, :] + y1f * s2[None, :]).to(y1.dtype)
    tl.store(kp, k1, mask=mk)
    tl.store(kp + HALF, k2, mask=mk)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        cp = slot * stride_cslot + hk[:, None] * stride_ch + d[None, :]
        tl.store(kc_ptr + cp, k1, mask=mk)
        tl.store(kc_ptr + cp + HALF, k2, mask=mk)
        vp = v_ptr + t * stride_vt + hk[:, None] * stride_vh + d[None, :]
        tl.store(vc_ptr + cp, tl.load(vp, mask=mk, other=0.0), mask=mk)
        tl.store(vc_ptr + cp + HALF, tl.load(vp + HALF, mask=mk, other=0.0), mask=mk)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor):
    """q (T,H,D), k/v (T,KVH,D) with unit stride on D; cos/sin (T,D); caches (blocks, block_size, KVH, D).

    Rotates q and k in place and writes k, v into the cache; returns (q, k)."""
    T, H, D = q.shape
    KVH = k.shape[1]
    if T == 0:
        return q, k
    half = D // 2
    cos, sin = cos.contiguous(), sin.contiguous()
    _rope_cache_kernel[(T,)](
        q, k, v, cos, sin, slot_mapping, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(1), k_cache.stride(2),
        H=H, KVH=KVH, HP=triton.next_power_of_2(H), KVHP=triton.next_power_of_2(KVH),
        HALF=half, HALFP=triton.next_power_of_2(half), num_warps=4)
    return q, k
