"""Batch staging: the one place where a scheduled step becomes flat int32 model inputs.

`stage_step` writes a step's token ids, positions, cache slots, sequence lengths, query starts, sampling rows
and block tables into host arrays (`StepBuffers`) and returns what else the forward needs (`StagedStep`).
The eager path stages into the runner's own buffers, the CUDA graphs into views of their static pinned
buffer; each then uploads and pads as its layout requires. Decodes come first (one row each, written with
vectorised numpy); prefill chunks follow, one sequence row each from `chunk_row` on (the mixed graphs keep a
fixed number of decode rows before them).

Nothing here allocates per token: per step a few small arrays for the decode rows and, per prefill chunk,
the slot computation over its range.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .scheduler import SchedulerOutput
from .window import FREED_BLOCK


class StepBuffers(NamedTuple):
    """Host arrays one step is staged into (int32; views of one buffer in the graph paths)."""

    ids: np.ndarray     # (T,) token ids
    pos: np.ndarray     # (rows, T) positions: rows = 3 for M-RoPE, else 1
    slot: np.ndarray    # (T,) KV cache slot of each token
    lens: np.ndarray    # (S,) context length of each sequence row after this step
    qsl: np.ndarray     # (S + 1,) first token row of each sequence row
    logits: np.ndarray  # (S,) token rows whose logits are sampled, in scheduled order
    bt: np.ndarray      # (S, W) block tables
    lim: np.ndarray | None = None  # (T,) last visible key position per token (bidirectional mm runs), or None


class StagedStep(NamedTuple):
    """What `stage_step` wrote: sizes, the prefill chunks' lengths, and the multimodal rows to scatter."""

    num_tokens: int
    num_rows: int                    # sequence rows used: chunk_row + number of chunks
    num_logits: int
    chunk_lens: list[int]
    mm_index: list[torch.Tensor]     # token rows (within the step) of multimodal rows
    mm_rows: list[torch.Tensor]      # the rows, matching mm_index


class BlockTableRows:
    """Host staging rows of the block table. A row is rewritten only where its sequence changed, got a new
    block or gave blocks back behind its window (a full rewrite per step costs ~4 us a row). The owner is the
    sequence's block-table list object, which changes when a sequence is preempted and re-admitted; a running
    sequence's table only grows at its end and turns into `FREED_BLOCK` at its start (`num_freed` entries)."""

    def __init__(self, rows: int):
        self.owner: list[tuple[object, int, int] | None] = [None] * rows

    def reset(self) -> None:
        self.owner = [None] * len(self.owner)

    def write(self, bt: np.ndarray, row: int, table: list[int], num_freed: int = 0) -> None:
        nb = len(table)
        own = self.owner[row]
        if own is not None and own[0] is table and own[1] <= nb and own[2] <= num_freed:
            if own[1] < nb:
                bt[row, own[1]:nb] = table[own[1]:]
            if own[2] < num_freed:
                bt[row, own[2]:num_freed] = FREED_BLOCK
            self.owner[row] = (table, nb, num_freed)
            return
        bt[row, :nb] = table
        self.owner[row] = (table, nb, num_freed)


def stage_step(sched: SchedulerOutput, buf: StepBuffers, tables: BlockTableRows, *, block_size: int,
               chunk_row: int) -> StagedStep:
    """Stage `sched` into `buf`: decodes in token and sequence rows [0, num_decodes), then each prefill chunk's
    tokens contiguously after them, its sequence row at chunk_row, chunk_row + 1, ... Padding is the caller's."""
    bs, mrope = block_size, buf.pos.shape[0] == 3
    scheduled, nd = sched.scheduled, sched.num_decodes
    mm_index: list[torch.Tensor] = []
    mm_rows: list[torch.Tensor] = []
    n_logits = 0
    if nd:
        seqs = [sc.seq for sc in scheduled[:nd]]
        idx = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=nd)
        pos_list = idx.tolist()
        buf.ids[:nd] = [s.token_ids[i] for s, i in zip(seqs, pos_list)]
        if mrope:
            for r in range(3):
                buf.pos[r, :nd] = idx + np.fromiter((s.mrope_deltas[r] for s in seqs), dtype=np.int64, count=nd)
        else:
            buf.pos[0, :nd] = idx
        last_blocks = np.fromiter((s.block_table[i // bs] for s, i in zip(seqs, pos_list)), dtype=np.int64,
                                  count=nd)
        buf.slot[:nd] = last_blocks * bs + idx % bs
        buf.lens[:nd] = idx + 1
        if buf.lim is not None:
            buf.lim[:nd] = idx
        rows = np.arange(nd)
        buf.qsl[:nd] = rows
        buf.logits[:nd] = rows  # every decode samples
        n_logits = nd
        for j, s in enumerate(seqs):
            tables.write(buf.bt, j, s.block_table, s.num_freed_blocks)
        if sched.num_prompt_decodes:  # prompt tokens: the prompt's positions, and maybe a multimodal row
            for j, (s, i) in enumerate(zip(seqs, pos_list)):
                if i < s.num_prompt_tokens:
                    buf.pos[:, j] = s.position_ids(i, i + 1, mrope).reshape(-1)
                    mm = s.mm_rows(i, i + 1)
                    if mm is not None:
                        mm_index.append(mm[0] + j)
                        mm_rows.append(mm[1])
    t = nd
    chunk_lens: list[int] = []
    row = chunk_row
    for sc in scheduled[nd:]:
        seq, s, e = sc.seq, sc.start, sc.end
        n = e - s
        buf.qsl[row] = t
        chunk_lens.append(n)
        if n == 1 and s >= seq.num_prompt_tokens:  # a generated token (a chunk of a recompute): no lookups
            buf.ids[t] = seq.token_ids[s]
            buf.pos[:, t] = [s + dl for dl in seq.mrope_deltas] if mrope else s
            buf.slot[t] = seq.block_table[s // bs] * bs + s % bs
            if buf.lim is not None:
                buf.lim[t] = s
        else:
            buf.ids[t:t + n] = seq.input_ids(s, e)
            buf.pos[:, t:t + n] = seq.position_ids(s, e, mrope)
            idx = np.arange(s, e)
            first = s // bs  # the chunk's blocks only
            blocks = np.asarray(seq.block_table[first:(e - 1) // bs + 1], dtype=np.int64)
            buf.slot[t:t + n] = blocks[idx // bs - first] * bs + idx % bs
            if buf.lim is not None:
                buf.lim[t:t + n] = seq.attn_limits(s, e)
            mm = seq.mm_rows(s, e)
            if mm is not None:
                mm_index.append(mm[0] + t)
                mm_rows.append(mm[1])
        buf.lens[row] = e
        tables.write(buf.bt, row, seq.block_table, seq.num_freed_blocks)
        t += n
        row += 1
        if sc.samples:
            buf.logits[n_logits] = t - 1
            n_logits += 1
    buf.qsl[row] = t
    return StagedStep(t, row, n_logits, chunk_lens, mm_index, mm_rows)
