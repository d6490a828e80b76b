"""CUDA graphs for small tower batches: one captured forward per batch layout, replayed.

A batch of one 448 px image is ~1,000 rows: the GPU needs ~3 ms for it, but launching the 32 layers' kernels
(and checking the compiled functions' guards) costs the host several times that. A captured graph replays the
whole forward with one launch. Batches above `max_rows` rows are GPU-bound and run as they are.

The cache is keyed by the batch layout (the tuple of grids), since every shape and index tensor of the forward
follows from it. A layout is captured the second time it is seen, so a stream of one-off sizes never pays for
captures; at most `max_graphs` graphs are kept (least recently used out), all in one memory pool. Each replay
copies the input into the graph's static buffer and returns a copy of its static output, so a later replay
(of any graph in the pool) never overwrites a result already handed out. A failed capture turns the cache off
for the tower (logged once); the forward then runs as it would without graphs.

Owns: capture, replay and eviction. Must not: know what the forward computes.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

log = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: torch.Tensor
    keep: object  # whatever the forward reads besides its input (the layout's index tensors)


class GraphCache:
    def __init__(self, *, max_rows: int = 16384, max_graphs: int = 32, capture_after: int = 2, name: str = "tower"):
        self.max_rows = max_rows
        self.max_graphs = max_graphs
        self.capture_after = capture_after
        self.name = name
        self.enabled = True
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        self._seen: dict[Hashable, int] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: Hashable, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
            keep: object = None) -> torch.Tensor:
        """fn(x), through the graph captured for `key` when there is (or now should be) one."""
        g = self._graphs.get(key)
        if g is None:
            if not self.enabled or x.shape[0] > self.max_rows or not x.is_cuda:
                return fn(x)
            if len(self._seen) > 4096:
                self._seen.clear()
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < self.capture_after:
                return fn(x)
            try:
                g = self._capture(x, fn, keep)
            except Exception as e:  # noqa: BLE001 - capture is a speed-up; the plain forward is always right
                log.warning("%s: CUDA graph capture failed (%s: %s); running without graphs",
                            self.name, type(e).__name__, e)
                self.enabled = False
                return fn(x)
            self._graphs[key] = g
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        g.static_in.copy_(x)
        g.graph.replay()
        return g.static_out.clone()

    def _capture(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], keep: object) -> _Captured:
        static_in = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture: library handles, workspaces, first runs
            fn(static_in)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: work other threads of the process launch meanwhile (cache writes, copies) stays legal
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = fn(static_in)
        log.info("%s: captured a CUDA graph for %d rows (%d graphs)", self.name, x.shape[0], len(self._graphs) + 1)
        return _Captured(graph, static_in, static_out, keep)
