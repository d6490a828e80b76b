"""TorchOps: the decoder's elementwise building blocks done by the HF modules themselves (exact HF numerics).

The decoder calls `add_norm`, `rope_and_cache`, `mlp` and, for sparse-MoE layers, `moe` (moe.py's router and
grouped experts); the CUDA variant (kernels/triton_ops.py) fuses each into one or two kernels over the same weights.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention.torch_ref import write_kv_torch
from .moe import MoESpec, sparse_moe


class TorchOps:
    name = "torch"

    def __init__(self, apply_rotary: Callable):
        self.apply_rotary = apply_rotary  # the model module's own apply_rotary_pos_emb

    def add_norm(self, h: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module):
        """residual += h (or residual = h at the start), then norm(residual): HF's `residual + out`, then norm."""
        residual = h if residual is None else residual + h
        return norm(residual), residual

    def norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """norm(x) alone (Gemma's sandwich norms; q/k norms over (T, heads, D)): the HF module itself."""
        return norm(x)

    def qkv(self, layer: int, attn: nn.Module, x: torch.Tensor):
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)

    def rope_and_cache(self, q, k, v, cos, sin, k_cache, v_cache, slot_mapping):
        """Rotate q (T,H,D) and k (T,KVH,D) with cos/sin (T,D), write k and v into the cache slots."""
        q, k = self.apply_rotary(q, k, cos, sin, unsqueeze_dim=1)
        write_kv_torch(k, v, k_cache, v_cache, slot_mapping)
        return q, k

    def mlp(self, layer: int, x: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
        return mlp(x)

    def moe(self, x: torch.Tensor, block: nn.Module, spec: MoESpec) -> torch.Tensor:
        act_fn, inter = block.experts.act_fn, block.experts.gate_up_proj.shape[1] // 2
        return sparse_moe(x, block, spec, act=lambda gu: act_fn(gu[:, :inter]) * gu[:, inter:])
