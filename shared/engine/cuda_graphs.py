"""DecodeGraphs: pure-decode steps replayed as CUDA graphs at bucketed batch sizes (1, 2, 4, 8, then steps of
16 up to max_num_seqs), captured largest first into one shared memory pool.

All graph inputs live in one int32 device buffer (token ids, positions, slots, lengths, block tables) that is
filled from one pinned host buffer with a single copy per step. Rows past the real batch are padding: slot -1
(the KV write skips them) and length 0 (attention returns zeros), so they change nothing.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .attention.base import AttentionMetadata
from .scheduler import SchedulerOutput

log = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, runner):
        self.runner = runner
        self.sizes = graph_batch_sizes(runner.config.max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.width = runner.max_blocks_per_seq
        n = self.max_bs
        self.rows = 3 if runner.mrope else 1
        # layout of the int32 input buffer
        self.o_ids, self.o_pos = 0, n
        self.o_slot = self.o_pos + self.rows * n
        self.o_len = self.o_slot + n
        self.o_bt = self.o_len + n
        total = self.o_bt + n * self.width
        self.host = torch.zeros(total, dtype=torch.int32, pin_memory=True)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(total, dtype=torch.int32, device=runner.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        # what each staging row of the block table holds now: (the sequence's block-table list, entries
        # written); the list object changes when a sequence is preempted and re-admitted. Rows are rewritten
        # only where the batch changed or a block was added (a full rewrite per step costs ~4 us a row)
        self._row_owner: list[tuple[object, int] | None] = [None] * n

    # ---- inputs ----------------------------------------------------------------------------------------------
    def _views(self, bs: int):
        d, n = self.dev, self.max_bs
        ids = d[self.o_ids:self.o_ids + bs]
        pos = d[self.o_pos:self.o_pos + self.rows * n].view(self.rows, n)[:, :bs]
        pos = pos if self.rows == 3 else pos[0]
        slots = d[self.o_slot:self.o_slot + bs]
        lens = d[self.o_len:self.o_len + bs]
        bt = d[self.o_bt:self.o_bt + n * self.width].view(n, self.width)[:bs]
        return ids, pos, slots, lens, bt

    def _forward(self, bs: int) -> torch.Tensor:
        r = self.runner
        ids, pos, slots, lens, bt = self._views(bs)
        meta = AttentionMetadata(slot_mapping=slots, seq_lens=lens, block_tables=bt, num_decodes=bs,
                                 query_start_loc_host=list(range(bs + 1)), seq_lens_host=[1] * bs)
        return r.decoder.forward(ids, pos, meta, r.kv_cache, r.attn, r.ops)

    def can_run(self, sched: SchedulerOutput) -> bool:
        if len(sched.scheduled) > self.max_bs:
            return False
        # true decodes only: the token is a generated one (no multimodal row, position = index + per-row delta)
        return all(sc.start >= sc.seq.num_prompt_tokens for sc in sched.scheduled)

    def _fill(self, sched: SchedulerOutput, bucket: int) -> None:
        h, n, bsz = self.host_np, self.max_bs, self.runner.block_size
        B = len(sched.scheduled)
        seqs = [sc.seq for sc in sched.scheduled]
        idx = np.fromiter((sc.start for sc in sched.scheduled), dtype=np.int64, count=B)
        h[self.o_ids:self.o_ids + B] = [s.token_ids[i] for s, i in zip(seqs, idx.tolist())]
        for r in range(self.rows):
            pos = idx + np.fromiter((s.mrope_deltas[r] for s in seqs), dtype=np.int64, count=B) if self.rows == 3 \
                else idx
            h[self.o_pos + r * n:self.o_pos + r * n + B] = pos
        last_blocks = np.fromiter((s.block_table[i // bsz] for s, i in zip(seqs, idx.tolist())), dtype=np.int64,
                                  count=B)
        h[self.o_slot:self.o_slot + B] = last_blocks * bsz + idx % bsz
        h[self.o_len:self.o_len + B] = idx + 1
        bt = h[self.o_bt:self.o_bt + n * self.width].reshape(n, self.width)
        owners = self._row_owner
        for i, s in enumerate(seqs):
            table = s.block_table
            nb = len(table)
            own = owners[i]
            if own is not None and own[0] is table:
                if own[1] == nb:
                    continue
                if own[1] < nb:
                    bt[i, own[1]:nb] = table[own[1]:]
                    owners[i] = (table, nb)
                    continue
            bt[i, :nb] = table
            owners[i] = (table, nb)
        if bucket > B:  # padding rows write nothing and attend to nothing
            h[self.o_ids + B:self.o_ids + bucket] = 0
            for r in range(self.rows):
                h[self.o_pos + r * n + B:self.o_pos + r * n + bucket] = 0
            h[self.o_slot + B:self.o_slot + bucket] = -1
            h[self.o_len + B:self.o_len + bucket] = 0
        end = self.o_bt + bucket * self.width
        self.dev[:end].copy_(self.host[:end], non_blocking=True)

    # ---- capture and replay ----------------------------------------------------------------------------------
    def _set_padding(self) -> None:
        self._row_owner = [None] * self.max_bs
        h = self.host_np
        h[:] = 0
        h[self.o_slot:self.o_slot + self.max_bs] = -1
        self.dev.copy_(self.host)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        self._set_padding()
        for bs in self.sizes:  # warm-up: compiles every kernel variant (split counts differ per size)
            self._forward(bs)
        torch.cuda.synchronize()
        for bs in reversed(self.sizes):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = self._forward(bs)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[bs], self.outputs[bs] = g, out
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch %s) in %.1fs", len(self.sizes), self.sizes,
                 time.perf_counter() - t0)

    def run(self, sched: SchedulerOutput) -> torch.Tensor:
        B = len(sched.scheduled)
        bucket = next(s for s in self.sizes if s >= B)
        self._fill(sched, bucket)
        self.graphs[bucket].replay()
        self.runner.stats_graph_steps += 1
        return self.outputs[bucket][:B]
