"""Variable-length attention for the towers: one call per layer, no per-sequence Python loop, no host sync.

A tower layer attends within segments of a flat (T, H, D) batch: windows or whole frames (Qwen vision),
chunks (the Omni audio encoder). transformers, for any implementation other than flash-attn, splits such a
layer into one SDPA call per segment after a `.tolist()` of the GPU lengths tensor: hundreds of tiny calls and
a host sync in every layer. Here the segments are planned ONCE per batch on the host, from plain ints known
before the forward (grids, clip lengths):

    plan = VarlenPlan.build(segments, total_rows)   # host: group segments by length, longest first
    out = varlen_sdpa(q, k, v, plan, scale)         # device: one batched SDPA per distinct length

Segments of equal length run as ONE batched `scaled_dot_product_attention` over (num_segments, H, L, D) views,
so a layer costs a handful of calls (one for a batch of equally sized images; at most four per frame shape
for windowed layers: full windows, right edge, bottom edge, corner). When the rows are already grouped (the
towers order their tokens so that the most frequent layer kind needs no reordering) the views are taken in
place; otherwise one gather before and one after the attention reorder the rows.

Why this design (checked against torch 2.14 in CI and torch 2.11 in the GPU image):
  - it is the same math as transformers' per-segment SDPA calls, on CPU and CUDA alike, so the eager tower
    is faithful to HF where CI can test it (fp32 CPU), and dispatches to the flash / efficient kernels on CUDA
    (measured on an H200: identical output to the per-window loop, 2.3x its speed);
  - `torch.nn.attention.varlen.varlen_attn` calls the flash-attention kernel only: CUDA and fp16/bf16 only
    (no CPU kernel, so CI could never run the path that serves), and its keyword arguments changed between
    releases (the first documented version takes no `scale`; 2.12 adds `enable_gqa`, `seqused_k`, ...);
  - flex attention needs `torch.compile` to be fast and a BlockMask rebuilt per batch; its eager CPU path is a
    slow reference implementation;
  - one SDPA with a block-diagonal mask does T^2 work per layer and loses the flash kernel (masks force the
    efficient or math backend).

Owns: the plan (grouping, gather / scatter indices) and the attention call. Must not: know about models.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class VarlenPlan:
    """How one layer kind attends: `groups` of equally long segments, contiguous in plan order.

    `groups` is ((seq_len, num_seqs), ...) in plan order. `gather` (T,) are the input rows in plan order and
    `scatter` (T,) its inverse; both are None when the input rows already are in plan order.
    """

    groups: tuple[tuple[int, int], ...]
    gather: torch.Tensor | None = None
    scatter: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return sum(length * n for length, n in self.groups)

    @staticmethod
    def build(segments: Sequence[np.ndarray], total_rows: int) -> tuple[VarlenPlan, np.ndarray]:
        """A plan over `segments` (each an int array of row indices, in the order the segment attends; together
        a permutation of range(total_rows)); empty segments are dropped. Segments are stably sorted by length,
        longest first. Returns the plan and its row order (plan position -> input row) as a numpy array."""
        segs = [np.asarray(s, dtype=np.int64) for s in segments if len(s)]
        lengths = np.array([len(s) for s in segs], dtype=np.int64)
        if int(lengths.sum()) != total_rows:
            raise ValueError(f"segments cover {int(lengths.sum())} rows, expected {total_rows}")
        order = np.argsort(-lengths, kind="stable")
        rows = np.concatenate([segs[i] for i in order]) if segs else np.zeros(0, dtype=np.int64)
        groups = tuple((int(length), int(n)) for length, n in _runs(lengths[order]))
        if np.array_equal(rows, np.arange(total_rows)):
            return VarlenPlan(groups), rows
        gather = torch.from_numpy(rows)
        return VarlenPlan(groups, gather, torch.from_numpy(np.argsort(rows))), rows

    def in_order(self) -> VarlenPlan:
        """The same plan for input rows that are already in its order."""
        return VarlenPlan(self.groups)

    def to(self, device: torch.device | str) -> VarlenPlan:
        if self.gather is None:
            return self
        return VarlenPlan(self.groups, self.gather.to(device), self.scatter.to(device))


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """Run-length encoding: [(value, count), ...] of consecutive equal values."""
    out: list[tuple[int, int]] = []
    for v in values.tolist():
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out


def varlen_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan, scale: float) -> torch.Tensor:
    """Bidirectional attention within the plan's segments. q, k, v: (T, H, D); returns (T, H * D) in input order."""
    if plan.gather is not None:
        q, k, v = q.index_select(0, plan.gather), k.index_select(0, plan.gather), v.index_select(0, plan.gather)
    T, H, D = q.shape
    outs = []
    off = 0
    for length, n in plan.groups:
        rows = slice(off, off + length * n)
        qq, kk, vv = (t[rows].view(n, length, H, D).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qq, kk, vv, scale=scale)  # (n, H, L, D)
        outs.append(o.transpose(1, 2).reshape(n * length, H * D))
        off += length * n
    if off != T:
        raise ValueError(f"attention plan covers {off} rows, the batch has {T}")
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    if plan.scatter is not None:
        out = out.index_select(0, plan.scatter)
    return out
