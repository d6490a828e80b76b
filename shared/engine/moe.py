"""Sparse-MoE feed-forward (Qwen3-VL-MoE, Qwen3-MoE style): the router and the experts over a flat batch, the one
implementation both op sets (ops.TorchOps, kernels/triton_ops.TritonOps) call with their own activation.

Weights are the HF modules' own, in place: `block.gate.weight` (E, hidden) and transformers 5's fused 3-D expert
parameters `block.experts.gate_up_proj` (E, 2 * I, hidden; gate rows then up rows) and `down_proj` (E, hidden, I).

- router: softmax in fp32 over the E logits, top-k, renormalised over the k when `norm_topk_prob` (model_spec.py
  reads the rule), cast to the activations' dtype: transformers' TopKRouter.
- experts: the T * k (token, expert) pairs sorted by expert, each expert's run through one grouped GEMM
  (`F.grouped_mm`, offsets on the device), then weighted, put back in pair order and summed over the k, in
  transformers' `grouped_mm` experts order (its default), so fp32 results match it bit for bit on the CPU.

No Python loop over experts or tokens and no `.tolist()` / `.item()`: every shape is fixed by T and k, the counts
and offsets stay on the device (experts that receive no pair cost only an empty group). In bf16 on CUDA the
grouped GEMM reads the offsets there, so a CUDA graph captures the layer; in fp16 / fp32 torch's grouped GEMM
copies them to the host on each call, so ModelRunner runs such models eagerly (docs/architecture.md, "Sparse
MoE"). Padded rows of a graph bucket are routed like any row and their outputs are never read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MoESpec:
    layers: tuple[bool, ...]   # per decoder layer: a sparse-MoE block (True) or a dense MLP
    num_experts: int
    top_k: int
    norm_topk_prob: bool       # renormalise the top-k probabilities to sum to 1


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, normalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (T, k) in x's dtype, expert ids (T, k)) of each row of x (T, hidden)."""
    probs = torch.softmax(F.linear(x, router_weight), dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), ids


def experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
            act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for every row t; `act` maps the (S, 2I) gate/up rows to
    (S, I) (silu(gate) * up)."""
    T, k = ids.shape
    E = gate_up.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert; stable: each group in token order
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    rows = x.index_select(0, order // k)
    y = F.grouped_mm(rows, gate_up.transpose(-2, -1), offs=offs)
    y = F.grouped_mm(act(y), down.transpose(-2, -1), offs=offs)
    y = y * weights.reshape(-1).index_select(0, order).unsqueeze(-1)
    out = torch.empty_like(y)
    out.index_copy_(0, order, y)  # back to (token, slot) order
    return out.view(T, k, -1).sum(dim=1)


def sparse_moe(x: torch.Tensor, block: nn.Module, spec: MoESpec, act: Callable[[torch.Tensor], torch.Tensor]
               ) -> torch.Tensor:
    """The MoE block's output for x (T, hidden), over the HF block's own weights."""
    weights, ids = route(x, block.gate.weight, spec.top_k, spec.norm_topk_prob)
    e = block.experts
    return experts(x, ids, weights, e.gate_up_proj, e.down_proj, act)
