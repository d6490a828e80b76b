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

A second, prefill-only set (`decodes=False`, D = 0, buckets up to PREFILL_ONLY_MAX_TOKENS) takes the short
steps that hold no decode: a turn's new tokens after a cached prefix on an idle server, a small prompt. There the
full set's D decode rows would still run the decode kernel and its merge in every layer over empty rows (175 us
of a 3.6 ms cached-turn step on an H200, BENCHMARKS.md) and add D rows to the LM head.
"""
from __future__ import annotations

import torch

from .attention.base import AttentionMetadata
from .block_manager import cdiv
from .cuda_graphs import StepGraphs
from .kernels.triton_prefill import prefill_block_m, prefill_work
from .scheduler import SchedulerOutput
from .staging import BlockTableRows, StagedStep, StepBuffers, stage_step

# Largest bucket of the prefill-only set: past it a step's prefill outweighs the empty decode rows' kernels.
PREFILL_ONLY_MAX_TOKENS = 256


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

    def __init__(self, runner, max_prefills: int, pool=None, decodes: bool = True):
        cfg = runner.config
        sizes = mixed_token_sizes(cfg.max_num_batched_tokens)
        if not decodes:
            self.kind = "prefill-only"
            sizes = [s for s in sizes if s <= PREFILL_ONLY_MAX_TOKENS] or sizes[:1]
        self.decodes = decodes
        self.max_tokens = sizes[-1]
        self.max_decodes = min(cfg.max_num_seqs, self.max_tokens) if decodes else 0
        self.max_prefills = max_prefills
        self.block_m = prefill_block_m(runner.dtype)
        self.width = runner.max_blocks_per_seq
        self.rows = 3 if runner.mrope else 1
        S, W, Tm = self.max_decodes + max_prefills, cdiv(self.max_tokens, self.block_m) + max_prefills, sizes[-1]
        self.has_lim = runner.bidirectional_mm
        segments = {"ids": Tm, "pos": self.rows * Tm, "slot": Tm, "len": S, "qsl": S + 1, "wseq": W, "wblk": W,
                    "logits": S, "bt": S * self.width}
        if self.has_lim:
            segments["lim"] = Tm  # after bt: uploaded with the rest (the copy covers every segment)
        super().__init__(runner, sizes, segments, S, pool)
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
            prefill_work=(self.seg("wseq", W), self.seg("wblk", W)),
            attn_limit=self.seg("lim", T) if self.has_lim else None)
        return r.decoder.forward(None, pos if self.rows == 3 else pos[0], meta, r.kv_cache, r.attn, r.ops,
                                 logits_index=self.seg("logits", S), inputs_embeds=self.hidden[:T],
                                 logits_out=self.logits[:S])

    def can_run(self, sched: SchedulerOutput) -> bool:
        return ((self.decodes or not sched.num_decodes)
                and len(sched.scheduled) - sched.num_decodes <= self.max_prefills
                and sched.num_tokens <= self.max_tokens
                and not (self.runner.decoder.num_deepstack and _has_mm_rows(sched)))

    def _fill(self, sched: SchedulerOutput, T: int) -> StagedStep:
        """Stage the step's inputs for bucket T and pad the rest of the bucket."""
        h = self.host_np
        D, S, W = self._dims(T)
        self.host_ready()
        buf = StepBuffers(ids=self.seg("ids", T, h), pos=self._positions(T, h), slot=self.seg("slot", T, h),
                          lens=self.seg("len", S, h), qsl=self.seg("qsl", S + 1, h),
                          logits=self.seg("logits", S, h), bt=self.seg("bt", S * self.width, h).reshape(S, self.width),
                          lim=self.seg("lim", T, h) if self.has_lim else None)
        st = stage_step(sched, buf, self.tables, block_size=self.runner.block_size, chunk_row=D)
        t, p, nd = st.num_tokens, len(st.chunk_lens), sched.num_decodes
        buf.lens[nd:D] = 0
        buf.lens[D + p:S] = 0
        buf.qsl[D + p:S + 1] = t
        buf.ids[t:T] = 0
        buf.pos[:, t:T] = 0
        buf.slot[t:T] = -1
        wseq, wblk = prefill_work(st.chunk_lens, self.block_m)
        self.seg("wseq", W, h)[:len(wseq)] = wseq
        self.seg("wseq", W, h)[len(wseq):] = -1
        self.seg("wblk", W, h)[:len(wblk)] = wblk
        buf.logits[st.num_logits:] = 0
        if buf.lim is not None:
            buf.lim[t:T] = 0
        self.upload(self.offsets["lim"] + T if self.has_lim else self.offsets["bt"] + S * self.width)
        return st

    def run(self, sched: SchedulerOutput) -> torch.Tensor:
        n = sched.num_tokens
        T = next(s for s in self.sizes if s >= n)
        st = self._fill(sched, T)
        r = self.runner
        dev = r.device
        mm_index = torch.cat(st.mm_index).to(dev) if st.mm_index else None
        mm_rows = torch.cat(st.mm_rows).to(dev) if st.mm_rows else None
        with torch.inference_mode():
            self.hidden[:st.num_tokens].copy_(r.decoder.embed(self.seg("ids", st.num_tokens), mm_index, mm_rows))
        out = self.replay(T)
        self.last_size = T
        r.stats_mixed_graph_steps += 1
        r.stats_prefill_graph_steps += not self.decodes
        return out[:st.num_logits]

    def _set_padding(self) -> None:
        self.tables.reset()
        h = self.host_np
        h[:] = 0
        self.seg("slot", self.max_tokens, h)[:] = -1
        self.seg("wseq", cdiv(self.max_tokens, self.block_m) + self.max_prefills, h)[:] = -1
        self.dev.copy_(self.host)


def _has_mm_rows(sched: SchedulerOutput) -> bool:
    """Whether a prefill chunk of the step holds multimodal rows (DeepStack adds them inside the layers, which
    the graph, fed only the embeddings, cannot: such a step runs eagerly)."""
    return any(sc.seq.mm_rows(sc.start, sc.end) is not None for sc in sched.scheduled[sched.num_decodes:])
