"""When each request was first scheduled and when its first token was sampled: the queue / prefill split of a
serving front's time to first token (services/generator/core.py).

Two halves, neither inside the engine nor per token:

  * `FirstTokenClock`, kept by whatever steps an LLMEngine (the engine-core process, AsyncLLMEngine's thread):
    `added` when a request enters the engine, `stepped` after each step with the step's outputs and when the
    step began and ended. It returns `(request id, first scheduled, first token)` for each request whose first
    token that step sampled: the start of the first step that scheduled it (a prefill chunk or the whole
    prompt) and the end of the step that sampled the token, on time.monotonic(), one clock for every process of
    a host. A request is watched only until its first token; while some wait to be scheduled, a step costs one
    set of the waiting ids.
  * `FirstTokenTimes`, the front's side: the thread that receives the steps `note`s them before it delivers the
    step's outputs, and the request's consumer `take`s its pair when it sees the first token (whether or not the
    stream merged outputs on the way). Only requests with an open stream are kept, so nothing accumulates.

From the engine-core process the triples ride the step's StepBatch (wire.py): no message of their own.
"""
from __future__ import annotations

import threading
from typing import Any

from .outputs import StepOutput

FirstToken = tuple[str, float, float]  # request id, first scheduled, first token (time.monotonic)


class FirstTokenClock:
    def __init__(self) -> None:
        self._unscheduled: set[str] = set()
        self._scheduled: dict[str, float] = {}  # request id -> first scheduled, until its first output

    def added(self, request_id: str) -> None:
        self._unscheduled.add(request_id)

    def stepped(self, engine: Any, outputs: list[StepOutput], started: float, ended: float) -> list[FirstToken]:
        if self._unscheduled:
            waiting = {s.request_id for s in engine.scheduler.waiting}
            for rid in self._unscheduled - waiting:  # admitted in this step (or aborted while waiting)
                self._scheduled[rid] = started
            self._unscheduled &= waiting
        firsts: list[FirstToken] = []
        if self._scheduled:
            for out in outputs:
                at = self._scheduled.pop(out.request_id, None)
                if at is not None and out.new_token_ids:
                    firsts.append((out.request_id, at, ended))
        return firsts


class FirstTokenTimes:
    """Thread-safe: `open` / `close` around a request's stream, `note` from the step reader, `take` once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[str] = set()
        self._times: dict[str, tuple[float, float]] = {}

    def open(self, request_id: str) -> None:
        with self._lock:
            self._open.add(request_id)

    def close(self, request_id: str) -> None:
        with self._lock:
            self._open.discard(request_id)
            self._times.pop(request_id, None)

    def note(self, firsts: list[FirstToken]) -> None:
        with self._lock:
            for rid, scheduled, sampled in firsts:
                if rid in self._open:
                    self._times[rid] = (scheduled, sampled)

    def take(self, request_id: str) -> tuple[float, float] | None:
        """(first scheduled, first token) of a request whose first token has been delivered, else None."""
        with self._lock:
            return self._times.pop(request_id, None)
