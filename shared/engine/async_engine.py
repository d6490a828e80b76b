"""AsyncLLMEngine: an asyncio front for LLMEngine, with the step loop in one background thread.

    aengine = AsyncLLMEngine(LLMEngine(model, config), max_waiting=256)
    async for out in aengine.generate(req):   # StepOutput per step until out.finished
        ...
    aengine.shutdown()                        # finishes in-flight requests, then stops the thread

The engine is touched only by its thread: callers post "add" / "abort" commands to a thread-safe queue that
the thread drains between steps. Outputs go back to each request's asyncio.Queue through
loop.call_soon_threadsafe. A consumer that goes away (generator closed, task cancelled) aborts its request,
which frees its KV blocks at the next step boundary.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mmpipe.shared.errors import InvalidInputError, MMPipeError, OverloadedError, ServiceUnavailableError
from mmpipe.shared.types import EngineRequest

from .llm_engine import LLMEngine
from .outputs import StepOutput

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    finished: bool = False


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, *, max_waiting: int = 1024, idle_wait_s: float = 0.05):
        self.engine = engine
        self.max_waiting = max_waiting
        self._idle_wait_s = idle_wait_s
        self._streams: dict[str, _Stream] = {}
        self._commands: collections.deque[tuple[str, object]] = collections.deque()
        self._lock = threading.Lock()  # guards _streams and the admission count
        self._wake = threading.Event()
        self._accepting = True
        self._stop = False
        self._error: BaseException | None = None
        self._pending_adds = 0
        self._thread = threading.Thread(target=self._run, name="mmpipe-engine", daemon=True)
        self._thread.start()

    # ---- public API ------------------------------------------------------------------------------------------
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._streams)

    async def generate(self, req: EngineRequest) -> AsyncIterator[StepOutput]:
        """Stream the StepOutputs of one request; the last one has finished=True."""
        if not self._accepting or not self.is_alive():
            raise ServiceUnavailableError("the generator engine is not accepting requests")
        self.engine.validate_request(req)  # LimitExceededError / InvalidInputError right here
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if req.request_id in self._streams:
                raise InvalidInputError(f"duplicate request id {req.request_id!r}", param="request_id")
            if self._pending_adds + self.engine.num_waiting_requests() >= self.max_waiting:
                raise OverloadedError(f"the generator queue is full ({self.max_waiting} waiting)")
            self._streams[req.request_id] = stream
            self._pending_adds += 1
        self._post("add", req)
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
                if item.finished:
                    stream.finished = True
                yield item
                if item.finished:
                    return
        finally:
            if not stream.finished:  # consumer left early: generator closed or task cancelled
                self.abort(req.request_id)
            with self._lock:
                self._streams.pop(req.request_id, None)

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe, idempotent); its stream ends with finish_reason "abort"."""
        self._post("abort", request_id)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking requests, let the in-flight ones finish, then stop the thread.

        Blocks; from inside an event loop use `await aengine.shutdown_async()`."""
        self._accepting = False
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    async def shutdown_async(self, timeout: float | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown, timeout)

    # ---- the engine thread -----------------------------------------------------------------------------------
    def _post(self, kind: str, payload: object) -> None:
        self._commands.append((kind, payload))
        self._wake.set()

    def _deliver(self, request_id: str, item: StepOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return  # consumer gone
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # its event loop is closed
            pass

    def _deliver_step(self, outputs: list[StepOutput]) -> None:
        """One step's outputs: one wake-up per event loop (not one per request), so a step of 128 streams costs
        one self-pipe write instead of 128, and the loop takes them in one callback."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # its event loop is closed
                pass

    def _drain_commands(self) -> None:
        while self._commands:
            kind, payload = self._commands.popleft()
            if kind == "add":
                req: EngineRequest = payload  # type: ignore[assignment]
                with self._lock:
                    self._pending_adds -= 1
                    live = req.request_id in self._streams
                if not live:
                    continue  # cancelled before it was added
                try:
                    self.engine.add_request(req)
                except MMPipeError as e:
                    self._deliver(req.request_id, e)
            else:
                self.engine.abort_request(str(payload))

    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                self._drain_commands()
                if self.engine.has_unfinished_requests():
                    self._deliver_step(self.engine.step())
                    continue
                if self._stop and not self._commands:
                    return
                self._wake.wait(self._idle_wait_s)
        except BaseException as e:  # noqa: BLE001 - a dead engine must fail every waiting consumer
            log.exception("engine loop died")
            self._error = e
            err = ServiceUnavailableError(f"the generator engine failed: {e!r}")
            with self._lock:
                ids = list(self._streams)
            for rid in ids:
                self._deliver(rid, err)


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)
