"""AsyncLLMEngine: an asyncio front for LLMEngine, with the step loop in one background thread.

    aengine = AsyncLLMEngine(LLMEngine(model, config), max_waiting=256)
    async for out in aengine.generate(req):   # StepOutput per step until out.finished
        ...
    aengine.shutdown()                        # finishes in-flight requests, then stops the thread

The engine is touched only by its thread: callers post "add" / "abort" commands to a thread-safe queue that
the thread drains between steps. Outputs go back to each request's asyncio.Queue through
loop.call_soon_threadsafe, one wake-up per event loop per step (streams.StreamTable). A consumer that goes
away (generator closed, task cancelled) aborts its request, which frees its KV blocks at the next step boundary.

The generator service runs the same step loop in its own process instead (core_process.py / core_client.py),
so that the steps do not share this process's GIL with gRPC; this front stays for the offline API, tests and
`--no-engine-process`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator

from mmpipe.shared.errors import MMPipeError, OverloadedError, ServiceUnavailableError
from mmpipe.shared.types import EngineRequest

from .llm_engine import LLMEngine
from .outputs import StepOutput
from .streams import StreamTable
from .timing import FirstTokenClock, FirstTokenTimes

log = logging.getLogger(__name__)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, *, max_waiting: int = 1024, idle_wait_s: float = 0.05):
        self.engine = engine
        self.max_waiting = max_waiting
        self._idle_wait_s = idle_wait_s
        self._streams = StreamTable()
        self._commands: collections.deque[tuple[str, object]] = collections.deque()
        self._lock = threading.Lock()  # guards the admission count
        self._wake = threading.Event()
        self._accepting = True
        self._stop = False
        self._error: BaseException | None = None
        self._pending_adds = 0
        self._clock = FirstTokenClock()  # when each request was first scheduled and sampled (timing.py)
        self._first_tokens = FirstTokenTimes()
        self._thread = threading.Thread(target=self._run, name="mmpipe-engine", daemon=True)
        self._thread.start()

    # ---- public API ------------------------------------------------------------------------------------------
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def num_unfinished(self) -> int:
        return len(self._streams)

    async def generate(self, req: EngineRequest) -> AsyncIterator[StepOutput]:
        """Stream the StepOutputs of one request; the last one has finished=True."""
        if not self._accepting or not self.is_alive():
            raise ServiceUnavailableError("the generator engine is not accepting requests")
        self.engine.validate_request(req)  # LimitExceededError / InvalidInputError right here
        stream = self._streams.open(req.request_id, self._admit)
        self._first_tokens.open(req.request_id)
        self._post("add", req)
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
    def _admit(self, _open_streams: int) -> None:
        with self._lock:
            if self._pending_adds + self.engine.num_waiting_requests() >= self.max_waiting:
                raise OverloadedError(f"the generator queue is full ({self.max_waiting} waiting)")
            self._pending_adds += 1

    def _post(self, kind: str, payload: object) -> None:
        self._commands.append((kind, payload))
        self._wake.set()

    def _drain_commands(self) -> None:
        while self._commands:
            kind, payload = self._commands.popleft()
            if kind == "add":
                req: EngineRequest = payload  # type: ignore[assignment]
                with self._lock:
                    self._pending_adds -= 1
                if req.request_id not in self._streams:
                    continue  # cancelled before it was added
                try:
                    self.engine.add_request(req)
                except MMPipeError as e:
                    self._streams.deliver(req.request_id, e)
                    continue
                self._clock.added(req.request_id)
            else:
                self.engine.abort_request(str(payload))

    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                self._drain_commands()
                if self.engine.has_unfinished_requests():
                    started = time.monotonic()
                    outputs = self.engine.step()
                    firsts = self._clock.stepped(self.engine, outputs, started, time.monotonic())
                    if firsts:
                        self._first_tokens.note(firsts)
                    self._streams.deliver_step(outputs)
                    continue
                if self._stop and not self._commands:
                    return
                self._wake.wait(self._idle_wait_s)
        except BaseException as e:  # noqa: BLE001 - a dead engine must fail every waiting consumer
            log.exception("engine loop died")
            self._error = e
            self._streams.fail_all(ServiceUnavailableError(f"the generator engine failed: {e!r}"))
