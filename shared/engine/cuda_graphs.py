"""CUDA graphs for engine steps, two kinds sharing one memory pool (built by the ModelRunner):

- DecodeGraphs: pure-decode steps at bucketed batch sizes (1, 2, 4, 8, then steps of 16 up to max_num_seqs);
- MixedGraphs (mixed_graphs.py): steps with prefill chunks (and the decodes riding along) at bucketed token
  counts.

Each kind keeps all its integer inputs (token ids, positions, slots, lengths, block tables, ...) in one int32
device buffer filled from one pinned host buffer with a single copy per step; the host buffer's segments are
filled by the engine's one staging function (staging.py), as `StepBuffers` views. Padding rows write nothing
(slot -1) and attend to nothing (length 0), so they change nothing. Graphs are captured largest first.

On the CPU (the Triton interpreter, TRITON_INTERPRET=1) nothing is captured: `replay` runs the same static-shape
forward eagerly on the same buffers, so CI tests the padding and fill logic of the CUDA path.
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod

import numpy as np
import torch

from .attention.base import AttentionMetadata
from .scheduler import SchedulerOutput
from .staging import BlockTableRows, StepBuffers, stage_step

log = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class StepGraphs(ABC):
    """Common machinery: the int32 input buffer (named segments), capture into the shared pool, replay."""

    kind = "step"

    def __init__(self, runner, sizes: list[int], segments: dict[str, int], logits_rows: int, pool=None):
        self.runner = runner
        self.sizes = sizes
        self.capture_enabled = runner.device.type == "cuda"
        self.pool = pool
        self.offsets: dict[str, int] = {}
        total = 0
        for name, n in segments.items():
            self.offsets[name] = total
            total += n
        self.host = torch.zeros(total, dtype=torch.int32, pin_memory=self.capture_enabled)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(total, dtype=torch.int32, device=runner.device)
        # the pinned host buffer is rewritten only once the previous step's copy out of it has run (a step
        # that samples nothing does not wait for the GPU, so the next one could otherwise overwrite it early)
        self.uploaded = torch.cuda.Event() if self.capture_enabled else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # one logits buffer for every size (allocated outside the pool; 40 MB at 128 rows of a 152k vocab)
        self.logits = torch.empty(logits_rows, runner.decoder.vocab_size, dtype=runner.dtype, device=runner.device)

    def seg(self, name: str, n: int, buf: torch.Tensor | np.ndarray | None = None):
        o = self.offsets[name]
        return (self.dev if buf is None else buf)[o:o + n]

    def upload(self, end: int) -> None:
        self.dev[:end].copy_(self.host[:end], non_blocking=True)
        if self.uploaded is not None:
            self.uploaded.record()

    def host_ready(self) -> None:
        """Wait (normally not at all) until the last upload has read the host buffer."""
        if self.uploaded is not None:
            self.uploaded.synchronize()

    # ---- provided by each kind --------------------------------------------------------------------------------
    @abstractmethod
    def _forward(self, size: int) -> torch.Tensor:
        """The step's forward at `size` over the static buffers; returns the logits buffer."""

    @abstractmethod
    def _set_padding(self) -> None:
        """Fill the buffers with inputs that write nothing and attend to nothing."""

    # ---- capture and replay ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        self._set_padding()
        if not self.capture_enabled:
            return
        t0 = time.perf_counter()
        for size in self.sizes:  # warm-up: compiles every kernel variant, picks cuBLAS algorithms
            self._forward(size)
        torch.cuda.synchronize()
        for size in reversed(self.sizes):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = self._forward(size)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[size], self.outputs[size] = g, out
        torch.cuda.synchronize()
        log.info("captured %d %s CUDA graphs (sizes %s) in %.1fs", len(self.sizes), self.kind, self.sizes,
                 time.perf_counter() - t0)

    def replay(self, size: int) -> torch.Tensor:
        if self.capture_enabled:
            self.graphs[size].replay()
            return self.outputs[size]
        with torch.inference_mode():
            return self._forward(size)


class DecodeGraphs(StepGraphs):
    kind = "decode"

    def __init__(self, runner, pool=None):
        sizes = graph_batch_sizes(runner.config.max_num_seqs)
        n = sizes[-1]
        self.max_bs = n
        self.width = runner.max_blocks_per_seq
        self.rows = 3 if runner.mrope else 1
        super().__init__(runner, sizes, {"ids": n, "pos": self.rows * n, "slot": n, "len": n, "qsl": n + 1,
                                         "logits": n, "bt": n * self.width}, n, pool)
        self.tables = BlockTableRows(n)

    # ---- inputs ----------------------------------------------------------------------------------------------
    def _views(self, bs: int):
        n = self.max_bs
        pos = self.seg("pos", self.rows * n).view(self.rows, n)[:, :bs]
        return (self.seg("ids", bs), pos if self.rows == 3 else pos[0], self.seg("slot", bs),
                self.seg("len", bs), self.seg("bt", n * self.width).view(n, self.width)[:bs])

    def _buffers(self) -> StepBuffers:
        h, n = self.host_np, self.max_bs
        return StepBuffers(ids=self.seg("ids", n, h), pos=self.seg("pos", self.rows * n, h).reshape(self.rows, n),
                           slot=self.seg("slot", n, h), lens=self.seg("len", n, h), qsl=self.seg("qsl", n + 1, h),
                           logits=self.seg("logits", n, h), bt=self.seg("bt", n * self.width, h).reshape(n, self.width))

    def _forward(self, bs: int) -> torch.Tensor:
        r = self.runner
        ids, pos, slots, lens, bt = self._views(bs)
        meta = AttentionMetadata(slot_mapping=slots, seq_lens=lens, block_tables=bt, num_decodes=bs,
                                 query_start_loc_host=list(range(bs + 1)), seq_lens_host=[1] * bs)
        return r.decoder.forward(ids, pos, meta, r.kv_cache, r.attn, r.ops, logits_out=self.logits[:bs])

    def can_run(self, sched: SchedulerOutput) -> bool:
        # true decodes only: the token is a generated one (no multimodal row, position = index + per-row delta)
        return (sched.num_decodes == len(sched.scheduled) <= self.max_bs) and not sched.num_prompt_decodes

    def _fill(self, sched: SchedulerOutput, bucket: int) -> None:
        B = len(sched.scheduled)
        self.host_ready()
        buf = self._buffers()
        stage_step(sched, buf, self.tables, block_size=self.runner.block_size, chunk_row=B)
        if bucket > B:  # padding rows write nothing and attend to nothing
            buf.ids[B:bucket] = 0
            buf.pos[:, B:bucket] = 0
            buf.slot[B:bucket] = -1
            buf.lens[B:bucket] = 0
        self.upload(self.offsets["bt"] + bucket * self.width)

    def _set_padding(self) -> None:
        self.tables.reset()
        self.host_np[:] = 0
        self.seg("slot", self.max_bs, self.host_np)[:] = -1
        self.dev.copy_(self.host)

    def run(self, sched: SchedulerOutput) -> torch.Tensor:
        B = len(sched.scheduled)
        bucket = next(s for s in self.sizes if s >= B)
        self._fill(sched, bucket)
        out = self.replay(bucket)
        self.runner.stats_graph_steps += 1
        return out[:B]
