"""EngineCoreClient: the asyncio front of an engine-core process, with AsyncLLMEngine's interface.

    client = EngineCoreClient(EngineCoreSpec(load=my_loader, engine_config=cfg), max_waiting=256)
    async for out in client.generate(req):   # StepOutput per step until out.finished
        ...
    client.shutdown()                        # the core finishes in-flight requests, then exits

The engine steps in a child process (spawned, never forked: CUDA) that loads the model itself
(core_process.py); this process keeps only the streams. Requests go out through a sender thread (a large
embedding never blocks the event loop, even while the core is busy), and one reader thread takes each step's
StepBatch and wakes each event loop once for all its streams (streams.StreamTable). `engine` is a
RemoteEngineView: the counters the service's metrics read, as of the core's latest step. `first_token_timing`
says when a request was first scheduled and got its first token (timing.py), as AsyncLLMEngine's does.

Supervision: when the core dies (a step raised, it was killed, it ran out of memory), the reader sees its
connection close, `is_alive()` turns False (the service's health follows it) and every open stream, and every
later `generate`, fails with ServiceUnavailableError at once instead of hanging. When the front exits without
`shutdown`, an atexit hook stops the core, and a front killed outright closes the connection, which ends the
core.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing as mp
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_ready
from typing import Any

from mmpipe.shared.errors import OverloadedError, ServiceUnavailableError
from mmpipe.shared.types import EngineRequest

from . import wire
from .core_process import EngineCoreSpec, run_engine_core
from .outputs import StepOutput
from .streams import StreamTable
from .timing import FirstTokenTimes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _BlockCounts:
    num_free_blocks: int
    num_blocks: int


@dataclass(frozen=True)
class _SchedulerCounts:
    num_preemptions: int


class RemoteEngineView:
    """LLMEngine's read-only face as the front sees it, under the names services/generator/core.py's metrics
    read from an in-process engine: num_running_requests(), num_waiting_requests(), stats,
    block_manager.num_free_blocks / num_blocks, scheduler.num_preemptions, kv_cache_info(). Every value is the
    one the core reported after its latest step (one reference swap per step; readers on any thread)."""

    def __init__(self, snapshot: wire.EngineSnapshot):
        self.update(snapshot)

    def update(self, snapshot: wire.EngineSnapshot) -> None:
        kv = snapshot.kv
        self.block_manager = _BlockCounts(int(kv["free_blocks"]), int(kv["num_blocks"]))
        self.scheduler = _SchedulerCounts(int(kv["num_preemptions"]))
        self._snapshot = snapshot

    @property
    def stats(self) -> dict[str, int]:
        return self._snapshot.stats

    def num_running_requests(self) -> int:
        return self._snapshot.num_running

    def num_waiting_requests(self) -> int:
        return self._snapshot.num_waiting

    def kv_cache_info(self) -> dict[str, Any]:
        return dict(self._snapshot.kv)


class EngineCoreClient:
    def __init__(self, spec: EngineCoreSpec, *, max_waiting: int = 1024, startup_timeout_s: float = 900.0):
        self.max_waiting = max_waiting
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=run_engine_core, args=(spec, child_conn), name="mmpipe-engine-core")
        self._proc.start()
        child_conn.close()  # only the child holds its end now, so its exit is our EOF
        # Runs before multiprocessing's own exit hook, which would otherwise wait for the child forever.
        atexit.register(self._stop_at_exit)
        self._streams = StreamTable()
        self._first_tokens = FirstTokenTimes()
        self._accepting = True
        self._alive = True
        self._closing = False
        self._dead_reason: str | None = None
        info = self._await_ready(startup_timeout_s)
        self.pid: int = info.pid
        self.load_info: dict[str, Any] = info.load_info
        self.engine = RemoteEngineView(info.snapshot)
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="mmpipe-core-send", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="mmpipe-core-recv", daemon=True)
        self._sender.start()
        self._reader.start()

    # ---- public API (AsyncLLMEngine's) ------------------------------------------------------------------------
    def is_alive(self) -> bool:
        return self._alive and self._proc.is_alive()

    def num_unfinished(self) -> int:
        return len(self._streams)

    async def generate(self, req: EngineRequest) -> AsyncIterator[StepOutput]:
        """Stream the StepOutputs of one request; the last one has finished=True. Requests the engine refuses
        (too long, bad shapes) raise the engine's own error class on the first iteration."""
        if not self._accepting or not self.is_alive():
            raise ServiceUnavailableError("the generator engine is not accepting requests")
        stream = self._streams.open(req.request_id, self._admit)
        if not self._alive:  # died between the check and the registration: fail_all did not see this stream
            self._streams.close(req.request_id)
            raise ServiceUnavailableError(self._death_message())
        self._first_tokens.open(req.request_id)
        self._outbox.put(("add", req))
        outs = self._streams.iterate(stream, self.abort)
        try:
            async for out in outs:
                yield out
        finally:
            self._first_tokens.close(req.request_id)
            await outs.aclose()  # closing this generator must abort the request now, not when it is collected

    def first_token_timing(self, request_id: str) -> tuple[float, float] | None:
        """(first scheduled, first token sampled) on time.monotonic(), once that first token has been delivered
        to the request's stream; taken once. None before that, or when the request is unknown."""
        return self._first_tokens.take(request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe, idempotent); its stream ends with finish_reason "abort"."""
        if self._alive:
            self._outbox.put(("abort", [request_id]))

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking requests; the core finishes the in-flight ones and exits (killed after `timeout`)."""
        self._accepting = False
        self._closing = True
        if self._proc.is_alive():
            self._outbox.put(("shutdown", None))
            self._proc.join(timeout)
        self._stop_process()
        self._reader.join(10)
        self._outbox.put(None)
        self._sender.join(10)
        self._conn.close()
        atexit.unregister(self._stop_at_exit)

    async def shutdown_async(self, timeout: float | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown, timeout)

    # ---- internals ----------------------------------------------------------------------------------------------
    def _admit(self, open_streams: int) -> None:
        # open streams = running + waiting in the core + on their way there
        if open_streams - self.engine.num_running_requests() >= self.max_waiting:
            raise OverloadedError(f"the generator queue is full ({self.max_waiting} waiting)")

    def _await_ready(self, timeout_s: float) -> wire.CoreInfo:
        ready = wait_ready([self._conn, self._proc.sentinel], timeout_s)
        if self._conn in ready:
            try:
                kind, body, _ = wire.recv(self._conn)
            except (EOFError, OSError):
                kind, body = "failed", None
            if kind == "ready":
                return body
        else:
            kind, body = "failed", None if ready else f"not ready after {timeout_s:.0f} s"
        self._stop_process()
        self._conn.close()
        atexit.unregister(self._stop_at_exit)
        why = body or f"the process exited with code {self._proc.exitcode}"
        raise ServiceUnavailableError(f"the generator engine core could not start: {why}")

    def _send_loop(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            kind, payload = msg
            try:
                if kind == "add":
                    wire.send_request(self._conn, payload)
                else:
                    wire.send(self._conn, kind, payload)
            except (BrokenPipeError, ConnectionResetError, OSError):
                return  # the core is gone; the reader sees the same and fails the streams

    def _read_loop(self) -> None:
        engine, streams = self.engine, self._streams
        while True:
            ready = wait_ready([self._conn, self._proc.sentinel])
            if self._conn not in ready:
                break  # exited with nothing left to read
            try:
                kind, body, _ = wire.recv(self._conn)
            except (EOFError, OSError):
                break
            if kind == "step":
                engine.update(body.snapshot)
                if body.first_tokens:  # before the outputs, so a consumer that sees the token finds its times
                    self._first_tokens.note(body.first_tokens)
                streams.deliver_step(body.outputs())
            elif kind == "error":
                streams.deliver(*wire.error_from(body))
            elif kind == "dead":
                self._dead_reason = body
        self._alive = False  # before fail_all: a generate that registers after it sees this and raises
        self._proc.join(5)
        if self._closing and self._dead_reason is None:
            log.info("engine core %d stopped (exit code %s)", self._proc.pid, self._proc.exitcode)
        else:
            log.error("%s", self._death_message())
        streams.fail_all(ServiceUnavailableError(self._death_message()))

    def _death_message(self) -> str:
        if self._closing and self._dead_reason is None:
            return "the generator engine has stopped"
        why = self._dead_reason or f"exit code {self._proc.exitcode}"
        return f"the generator engine process {self._proc.pid} died ({why})"

    def _stop_process(self) -> None:
        if self._proc.is_alive():
            log.warning("engine core %d did not stop in time: terminating it", self._proc.pid)
            self._proc.terminate()
            self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def _stop_at_exit(self) -> None:
        self._closing = True
        self._conn.close()  # the core's reader sees EOF and the core exits
        self._proc.join(5)
        self._stop_process()
