"""TritonOps: the decoder's elementwise steps as fused Triton kernels over the HF modules' weights
(same interface as ops.TorchOps). Cuts a decode layer from ~30 small launches to ~12, which is what
matters at small batch once the step runs as a CUDA graph.

With `pack=True` the q/k/v and gate/up weights of each layer are moved into one buffer each and the HF
parameters are re-pointed to views of it: one GEMM instead of three (two), no second copy kept, and the
HF model keeps working (its Linear modules read the same memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..moe import MoESpec, sparse_moe
from .triton_fused import add_rmsnorm, rope_and_cache, silu_mul
from .triton_gemm import GemmTile, short_gate_up_silu

# Up to TritonOps.short_gemm_max_rows rows the packed gate/up projection runs through the short-step GEMM with
# silu(gate) * up in its epilogue (H200, bench/short_gemm_probe.py, 36 layers of distinct weights in a CUDA
# graph: 8-13% faster than cuBLAS + silu_mul at 16-64 rows, even at 96, slower at 128; BENCHMARKS.md, "Prefix
# caching", session 8); past it the MLP is F.linear then silu_mul (q/k/v, o_proj and down_proj stay on cuBLAS at
# every size: it was as fast or faster than a Triton GEMV or GEMM). From one row: at batch 1-8 it replaced the
# fused gate/up GEMV (23.5-24.2 us a layer against 24.0-24.8; whole decode steps 1.010-1.024x; session 9, run 22).
# Tiles by rows, from whole captured steps of the 3B-sized model (runs 16 and 18): 32 x 64 up to 16 rows and at
# 48 and 64 (1.043-1.048x the cuBLAS step) but 0.993x at 32, where 64 x 64 gives 1.020x (and 1.031-1.040x
# elsewhere).
SHORT_GATE_UP_TILES = ((16, GemmTile(block_n=32, block_k=64)), (32, GemmTile(block_n=64, block_k=64)),
                       (128, GemmTile(block_n=32, block_k=64)))


def short_gate_up_tile(rows: int) -> GemmTile:
    return next(t for most, t in SHORT_GATE_UP_TILES if rows <= most)


def _eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    return 1e-6


def _pack(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of `linears` along the output dim and re-point each module."""
    w = torch.cat([m.weight.data for m in linears])
    has_bias = [m.bias is not None for m in linears]
    b = torch.cat([m.bias.data for m in linears]) if all(has_bias) else None
    o = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = w[o:o + n]
        if b is not None:
            m.bias.data = b[o:o + n]
        o += n
    return w, b


class TritonOps:
    name = "triton"
    # Read when a step runs, so a CUDA graph keeps the value it was captured with; benchmarks set the class
    # attribute before building an engine (0: cuBLAS and silu_mul for every row count).
    short_gemm_max_rows = 64

    def __init__(self, decoder, pack: bool = False):
        self.fuse_mlp = decoder.hidden_act in ("silu", "swish")
        self.unit_offset = decoder.spec.norm_unit_offset  # Gemma's RMSNorm: * (1 + weight), in fp32
        self.qkv_packed: list[tuple[torch.Tensor, torch.Tensor | None, list[int]]] = []
        self.gate_up_packed: dict[int, torch.Tensor] = {}  # dense layers only (a MoE layer's experts are fused)
        if pack:
            with torch.no_grad():
                for layer in decoder.layers:
                    a = layer.self_attn
                    lins = [a.q_proj, a.k_proj, a.v_proj]
                    if any(m.bias is not None for m in lins) and not all(m.bias is not None for m in lins):
                        self.qkv_packed = []
                        break
                    w, b = _pack(lins)
                    self.qkv_packed.append((w, b, [m.weight.shape[0] for m in lins]))
                if self.fuse_mlp:
                    moe = decoder.spec.moe
                    for i, layer in enumerate(decoder.layers):
                        m = layer.mlp
                        if moe is not None and moe.layers[i]:
                            continue
                        if m.gate_proj.bias is None and m.up_proj.bias is None:
                            self.gate_up_packed[i] = _pack([m.gate_proj, m.up_proj])[0]
                torch.cuda.empty_cache()

    def add_norm(self, h: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module):
        return add_rmsnorm(h, residual, norm.weight, _eps(norm), unit_offset=self.unit_offset)

    def norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """One fused kernel instead of the HF module's six or seven (per-head q/k norms flatten to rows)."""
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        return add_rmsnorm(rows, None, norm.weight, _eps(norm), unit_offset=self.unit_offset)[0].view(x.shape)

    def qkv(self, layer: int, attn: nn.Module, x: torch.Tensor):
        if self.qkv_packed:
            w, b, sizes = self.qkv_packed[layer]
            return F.linear(x, w, b).split(sizes, dim=-1)  # strided views; the kernels take strides
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)

    def rope_and_cache(self, q, k, v, cos, sin, k_cache, v_cache, slot_mapping):
        return rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)

    def mlp(self, layer: int, x: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
        if not self.fuse_mlp:
            return mlp(x)
        w = self.gate_up_packed.get(layer)
        if w is not None:
            if x.shape[0] <= self.short_gemm_max_rows and x.stride(-1) == 1:
                return mlp.down_proj(short_gate_up_silu(x, w, short_gate_up_tile(x.shape[0])))
            gu = F.linear(x, w)
            inter = gu.shape[-1] // 2
            return mlp.down_proj(silu_mul(gu[:, :inter], gu[:, inter:]))
        return mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))

    def moe(self, x: torch.Tensor, block: nn.Module, spec: MoESpec) -> torch.Tensor:
        """Router and grouped expert GEMMs as in TorchOps (moe.py); silu(gate) * up fused into one kernel."""
        inter = block.experts.gate_up_proj.shape[1] // 2
        if self.fuse_mlp:
            act = lambda gu: silu_mul(gu[:, :inter], gu[:, inter:])  # noqa: E731
        else:
            act_fn = block.experts.act_fn
            act = lambda gu: act_fn(gu[:, :inter]) * gu[:, inter:]  # noqa: E731
        return sparse_moe(x, block, spec, act)
