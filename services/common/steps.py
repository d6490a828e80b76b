"""A request's time in each step of a stage: one histogram per stage and, with tracing on, one span per step.

Every stage has the one histogram `mmpipe_<stage>_step_duration_seconds{model, step}` (base unit, buckets from
half a millisecond to 30 s), and a step timed here is also a child span of the same name when
--otlp-traces-endpoint is set (services/common/tracing.py). The steps (docs/architecture.md, "Finding the
bottleneck"):

  gateway    parse, template, tokenize (CPU, per request), resolve (media -> cache keys: look-ups, ingest),
             first_token (the Generate call until its first message)
  ingest     fetch, decode, hash (per item, in the worker threads); load (all items' fetch + decode + hash),
             lookup, preprocess, encode (the Encode call), per request
  encoder    queue (per item: submitted until its tower batch starts), finish (per batch: uint8 pixels to the
             device and normalised), cache_write (per Encode call); the tower itself is the existing
             mmpipe_encoder_encode_duration_seconds
  generator  fetch (the embeddings' MGET), build (build_engine_request), queue (handed to the engine until first
             scheduled), prefill (first scheduled until the step that sampled the first token ends)

Time to first token stays where it was: mmpipe_gateway_time_to_first_token_seconds (from the request's arrival)
and mmpipe_generator_time_to_first_token_seconds (from the Generate call's arrival).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import perf_counter  # not `import time`: StepTimer has a method of that name
from typing import Any

from mmpipe.services.common import tracing

STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STEP_DOC = "time of a request in each step of this stage (label step)"


class StepTimer:
    """Observe steps of one stage for one model: `time` / `timed` around the work, `since` / `record` for work
    timed by hand (a thread, another process's clock, a batch shared by several requests)."""

    __slots__ = ("_histogram", "_model", "_children")

    def __init__(self, histogram: Any, model: str):
        self._histogram = histogram  # labels (model, step)
        self._model = model
        self._children: dict[str, Any] = {}

    def observe(self, step: str, seconds: float) -> None:
        child = self._children.get(step)
        if child is None:
            child = self._children[step] = self._histogram.labels(self._model, step)
        child.observe(max(0.0, seconds))

    @contextmanager
    def time(self, step: str) -> Iterator[None]:
        t0 = perf_counter()
        try:
            if tracing.enabled():
                with tracing.span(step):
                    yield
            else:
                yield
        finally:
            self.observe(step, perf_counter() - t0)

    async def timed(self, step: str, aw):
        """Await `aw` as one step."""
        with self.time(step):
            return await aw

    def since(self, step: str, t0: float) -> None:
        """A step that began at `t0` (time.perf_counter) and ends now."""
        self.record(step, t0, perf_counter())

    def record(self, step: str, start: float, end: float, *, clock: Callable[[], float] = perf_counter,
               span: bool = True) -> None:
        """A step from `start` to `end` (readings of `clock`); `span=False`: the histogram only."""
        self.observe(step, end - start)
        if span:
            tracing.record(step, start, end, clock=clock)
