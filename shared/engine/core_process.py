"""The engine-core process: LLMEngine's step loop alone in its own process, fed over one connection.

vLLM V1's EngineCore shape: the process that serves the streams (gRPC, asyncio, hundreds of coroutines) is not
the one that steps the engine, so the steps never wait for that process's GIL. Here:

  * the main thread builds the engine (`spec.load` loads the model, here and nowhere else) and then only
    steps it: between steps it applies the adds and aborts that arrived, and after each step it queues ONE
    StepBatch holding the outputs of every request in that step and the engine's counters (and, for each
    request whose first token it sampled, when that request was first scheduled: timing.FirstTokenClock);
  * an input thread reads the connection (requests arrive while a step runs, so a large embedding never
    waits for the step to end, and the front never blocks on a full socket);
  * an output thread pickles and writes the batches, so a slow reader never stalls the step loop.

It ends on "shutdown" (after finishing the requests in flight, as AsyncLLMEngine.shutdown does), or when the
front's end of the connection closes (the front died: the process exits, which frees everything). A step
that raises sends "dead" with the error and exits with status 1. No asyncio and no gRPC in here.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from torch import nn

from mmpipe.shared.errors import MMPipeError, ServiceUnavailableError

from . import wire
from .config import EngineConfig
from .llm_engine import LLMEngine
from .timing import FirstTokenClock

log = logging.getLogger(__name__)

# load(**load_kwargs) -> (the HF model the engine runs, plain facts for the front such as {"weights": ...})
ModelLoader = Callable[..., tuple[nn.Module, dict[str, Any]]]


@dataclass
class EngineCoreSpec:
    """What the engine-core process needs to build its engine; pickled to the child, so `load` and `setup`
    must be importable top-level callables (or functools.partial of them).

    load: loads the model in the child and returns it with facts for the front. engine_config: the engine's
    settings (device and dtype resolved). setup: runs first in the child (logging). idle_wait_s: how long the
    idle loop sleeps between checks when nothing arrives."""

    load: ModelLoader
    engine_config: EngineConfig
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[], None] | None = None
    idle_wait_s: float = 0.05


def run_engine_core(spec: EngineCoreSpec, conn: Connection) -> None:
    """The child process's entry point (multiprocessing target)."""
    # Ctrl-C reaches the whole process group: the front decides when the core stops (it sends "shutdown").
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.setup is not None:
        spec.setup()
    try:
        model, load_info = spec.load(**spec.load_kwargs)
        engine = LLMEngine(model, spec.engine_config)
    except BaseException as e:  # noqa: BLE001 - whatever stops the build is reported to the front, then re-raised
        log.exception("the engine core could not start")
        wire.send(conn, "failed", f"{type(e).__name__}: {e}")
        conn.close()
        raise
    EngineCore(engine, conn, spec.idle_wait_s).run(load_info)


class EngineCore:
    """The step loop over one connection (see the module docstring)."""

    def __init__(self, engine: LLMEngine, conn: Connection, idle_wait_s: float = 0.05):
        self.engine = engine
        self.conn = conn
        self.idle_wait_s = idle_wait_s
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake = threading.Event()
        self._outbox: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._stopping = False  # "shutdown": finish what runs, take nothing new
        self._front_gone = False
        self._clock = FirstTokenClock()

    def snapshot(self) -> wire.EngineSnapshot:
        e = self.engine
        return wire.EngineSnapshot(e.num_running_requests(), e.num_waiting_requests(), dict(e.stats),
                                   e.kv_cache_info())

    def run(self, load_info: dict[str, Any]) -> None:
        writer = threading.Thread(target=self._write_loop, name="mmpipe-core-out", daemon=True)
        reader = threading.Thread(target=self._read_loop, name="mmpipe-core-in", daemon=True)
        writer.start()
        self._outbox.put(("ready", wire.CoreInfo(self.snapshot(), load_info, os.getpid())))
        reader.start()
        try:
            self._step_loop()
        except BaseException as e:  # noqa: BLE001 - tell the front why, then die with the error
            log.exception("engine core step loop died")
            self._outbox.put(("dead", f"{type(e).__name__}: {e}"))
            self._outbox.put(None)
            writer.join(10)
            raise
        self._outbox.put(None)
        writer.join()
        self.conn.close()

    def _step_loop(self) -> None:
        engine = self.engine
        while True:
            self._wake.clear()
            self._apply_inbox()
            if self._front_gone:
                return  # nobody is left to read the tokens; the process's exit frees everything
            if engine.has_unfinished_requests():
                started = time.monotonic()
                outputs = engine.step()
                firsts = self._clock.stepped(engine, outputs, started, time.monotonic())
                self._outbox.put(("step", (outputs, self.snapshot(), firsts)))  # encoded by the output thread
                continue
            if self._stopping:
                return
            self._wake.wait(self.idle_wait_s)

    def _apply_inbox(self) -> None:
        while self._inbox:
            kind, payload = self._inbox.popleft()
            if kind == "add":
                req = payload
                if self._stopping:
                    err = ServiceUnavailableError("the generator engine is shutting down")
                    self._outbox.put(("error", wire.error_body(req.request_id, err)))
                    continue
                try:
                    self.engine.add_request(req)
                except MMPipeError as e:  # the request's fault (too long, bad shapes): that stream fails
                    self._outbox.put(("error", wire.error_body(req.request_id, e)))
                    continue
                self._clock.added(req.request_id)
            elif kind == "abort":
                for rid in payload:
                    self.engine.abort_request(rid)
            elif kind == "shutdown":
                self._stopping = True
            elif kind == "eof":
                self._front_gone = True

    def _read_loop(self) -> None:
        while True:
            try:
                kind, body, tensors = wire.recv(self.conn)
            except (EOFError, OSError):
                self._post("eof", None)
                return
            if kind == "add":
                self._post("add", wire.request_from(body, tensors))
            else:
                self._post(kind, body)
                if kind == "shutdown":
                    return

    def _post(self, kind: str, payload: Any) -> None:
        self._inbox.append((kind, payload))
        self._wake.set()

    def _write_loop(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            kind, body = msg
            if kind == "step":
                body = wire.StepBatch.of(*body)
            try:
                wire.send(self.conn, kind, body)
            except (BrokenPipeError, ConnectionResetError, OSError):
                self._post("eof", None)  # the front is gone: nobody to write to
                return

