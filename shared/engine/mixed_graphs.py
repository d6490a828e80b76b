"""MixedGraphs: steps with prefill chunks (and the decodes riding along) replayed as CUDA graphs at bucketed
token counts (16, 32, 64, then steps of >= 128 up to max_num_batched_tokens).

Why: an eager 1,000-token step launches ~400 kernels and is host-bound (about 27 ms of launches for 12 ms of
GPU work on an H100, BENCHMARKS.md); replayed as a graph it costs what its kernels cost.

Static layout of a step of bucket T, with D = min(max_num_seqs, T) decode rows and P = max_prefills chunks:
- token rows [0, T): the step's tokens, decodes first, then the chunks, then padding (slot -1, writes nothing);
- sequence rows [0, D) are decodes; rows past the real ones have length 0, so the decode kernel writes zeros
  for them, which the prefill kernel then overwrites where those token rows belong to chunks. Rows [D, D + P)
  are the chunks: query_start_loc entries D .. D + P hold absolute token offsets, padding chunks are empty;
- the prefill kernel's work list has cdiv(T, block_m) + P entries; unused ones (sequence -1) exit at once;
- logits are computed for D + P rows: the sampling rows first, then row 0 as padding.
The embedding lookup (and the multimodal rows written over it) runs eagerly into a static hidden-state
buffer before the replay: that is two kernels, and the multimodal scatter's size varies from step to step.
"""
from __future__ import annotations

import numpy as np
import torch

from .attention.base import AttentionMetadata
from .block_manager import cdiv
from .cuda_graphs import BlockTableRows, StepGraphs
from .kernels.triton_prefill import prefill_block_m, prefill_work
from .scheduler import SchedulerOutput


def mixed_token_sizes(max_tokens: int) -> list[int]:
    """Token buckets: 16, 32, 64, then steps of 128 (or max/16 when larger) up to max_tokens."""
    sizes = [s for s in (16, 32, 64) if s < max_tokens]
    step = 128 * max(1, cdiv(max_tokens, 16 * 128))
    t = step
    while t < max_tokens:
        sizes.append(t)
        t += step
    sizes.append(max_tokens)
    return sizes


class MixedGraphs(StepGraphs):
    kind = "mixed"

    def __init__(self, runner, max_prefills: int, pool=None):
        cfg = runner.config
        sizes = mixed_token_sizes(cfg.max_num_batched_tokens)
        self.max_tokens = sizes[-1]
        self.max_decodes = min(cfg.max_num_seqs, self.max_tokens)
        self.max_prefills = max_prefills
        self.block_m = prefill_block_m(runner.dtype)
        self.width = runner.max_blocks_per_seq
        self.rows = 3 if runner.mrope else 1
        S, W, Tm = self.max_decodes + max_prefills, cdiv(self.max_tokens, self.block_m) + max_prefills, sizes[-1]
        super().__init__(runner, sizes, {"ids": Tm, "pos": self.rows * Tm, "slot": Tm, "len": S, "qsl": S + 1,
                                         "wseq": W, "wblk": W, "logits": S, "bt": S * self.width}, S, pool)
        d = runner.decoder
        self.hidden = torch.zeros(Tm, d.hidden_size, dtype=runner.dtype, device=runner.device)
        self.tables = BlockTableRows(S)
        self.last_size = 0  # bucket of the last replayed step (benchmarks time its graph alone)

    def _dims(self, T: int) -> tuple[int, int, int]:
        """(decode rows, sequence rows, work items) of bucket T."""
        D = min(self.max_decodes, T)
        return D, D + self.max_prefills, cdiv(T, self.block_m) + self.max_prefills

    # ---- inputs ----------------------------------------------------------------------------------------------
    def _positions(self, T: int, buf=None):
        return self.seg("pos", self.rows * self.max_tokens, buf).reshape(self.rows, self.max_tokens)[:, :T]

    def _forward(self, T: int) -> torch.Tensor:
        r = self.runner
        D, S, W = self._dims(T)
        pos = self._positions(T)
        meta = AttentionMetadata(
            slot_mapping=self.seg("slot", T), seq_lens=self.seg("len", S),
            block_tables=self.seg("bt", S * self.width).view(S, self.width), num_decodes=D,
            query_start_loc_host=[], seq_lens_host=[], query_start_loc=self.seg("qsl", S + 1),
            prefill_work=(self.seg("wseq", W), self.seg("wblk", W)))
        return r.decoder.forward(None, pos if self.rows == 3 else pos[0], meta, r.kv_cache, r.attn, r.ops,
                                 logits_index=self.seg("logits", S), inputs_embeds=self.hidden[:T],
                                 logits_out=self.logits[:S])

    def can_run(self, sched: SchedulerOutput) -> bool:
        return (len(sched.scheduled) - sched.num_decodes <= self.max_prefills
                and sched.num_tokens <= self.max_tokens)

    def _fill(self, sched: SchedulerOutput, T: int) -> tuple[int, int, list]:
        """Stage the step's inputs for bucket T; returns (tokens, sampling rows, multimodal pieces)."""
        h, bsz, mrope = self.host_np, self.runner.block_size, self.rows == 3
        D, S, W = self._dims(T)
        ids, slot, lens = self.seg("ids", T, h), self.seg("slot", T, h), self.seg("len", S, h)
        qsl, logits = self.seg("qsl", S + 1, h), self.seg("logits", S, h)
        pos = self._positions(T, h)
        bt = self.seg("bt", S * self.width, h).reshape(S, self.width)
        nd = sched.num_decodes
        t = n_logits = 0
        mm, chunk_lens = [], []
        for j, sc in enumerate(sched.scheduled):
            seq, s, e = sc.seq, sc.start, sc.end
            row = j if j < nd else D + (j - nd)
            if j >= nd:
                qsl[row] = t
                chunk_lens.append(e - s)
            if e - s == 1 and s >= seq.num_prompt_tokens:  # a generated token: no table lookups needed
                ids[t] = seq.token_ids[s]
                pos[:, t] = [s + dl for dl in seq.mrope_deltas] if mrope else s
                slot[t] = seq.block_table[s // bsz] * bsz + s % bsz
            else:
                ids[t:t + e - s] = seq.token_ids[s:e]
                pos[:, t:t + e - s] = seq.position_ids(s, e, mrope).numpy()
                idx = np.arange(s, e)
                slot[t:t + e - s] = np.asarray(seq.block_table, dtype=np.int64)[idx // bsz] * bsz + idx % bsz
                rows = seq.mm_rows(s, e)
                if rows is not None:
                    mm.append((rows[0] + t, rows[1]))
            lens[row] = e
            self.tables.write(bt, row, seq.block_table)
            t += e - s
            if sc.samples:
                logits[n_logits] = t - 1
                n_logits += 1
        p = len(chunk_lens)
        lens[nd:D] = 0
        lens[D + p:S] = 0
        qsl[D + p:S + 1] = t
        ids[t:T] = 0
        pos[:, t:T] = 0
        slot[t:T] = -1
        wseq, wblk = prefill_work(chunk_lens, self.block_m)
        self.seg("wseq", W, h)[:len(wseq)] = wseq
        self.seg("wseq", W, h)[len(wseq):] = -1
        self.seg("wblk", W, h)[:len(wblk)] = wblk
        logits[n_logits:] = 0
        self.upload(self.offsets["bt"] + S * self.width)
        return t, n_logits, mm

    def run(self, sched: SchedulerOutput) -> torch.Tensor:
        n = sched.num_tokens
        T = next(s for s in self.sizes if s >= n)
        t, n_logits, mm = self._fill(sched, T)
        r = self.runner
        dev = r.device
        mm_index = torch.cat([m[0] for m in mm]).to(dev) if mm else None
        mm_rows = torch.cat([m[1] for m in mm]).to(dev) if mm else None
        with torch.inference_mode():
            self.hidden[:t].copy_(r.decoder.embed(self.seg("ids", t), mm_index, mm_rows))
        out = self.replay(T)
        self.last_size = T
        r.stats_mixed_graph_steps += 1
        return out[:n_logits]

    def _set_padding(self) -> None:
        self.tables.reset()
        h = self.host_np
        h[:] = 0
        self.seg("slot", self.max_tokens, h)[:] = -1
        self.seg("wseq", cdiv(self.max_tokens, self.block_m) + self.max_prefills, h)[:] = -1
        self.dev.copy_(self.host)
