"""StreamTable: the per-request output queues of an asyncio engine front, shared by both fronts.

AsyncLLMEngine (engine stepping in a thread of this process) and EngineCoreClient (engine stepping in its own
process) differ only in where the steps run; what a consumer sees is the same and lives here:

  * `open` registers a request's stream on the caller's event loop (duplicate ids refused);
  * `deliver_step` hands one step's outputs to their streams with one wake-up per event loop (one self-pipe
    write for a step of 128 streams, not 128), from any thread;
  * `iterate` is the consumer's side: StepOutputs until the finished one, an exception delivered instead of
    an output is raised, and a consumer that leaves early (generator closed, task cancelled) calls `on_leave`
    so the front can abort the request in its engine. Outputs that are already waiting when the consumer asks
    for the next one come as ONE StepOutput (coalescing, vLLM's RequestOutputCollector): a consumer that fell
    behind (a busy front, a slow gRPC reader) catches up in one message instead of one per step, and nothing
    ever waits for an output that is not there yet;
  * `fail_all` ends every open stream with one error (the engine died).

Thread-safe; it knows nothing of engines.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from mmpipe.shared.errors import InvalidInputError

from .outputs import StepOutput


@dataclass
class Stream:
    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False


class StreamTable:
    def __init__(self) -> None:
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._streams

    def open(self, request_id: str, admit: Callable[[int], None] | None = None) -> Stream:
        """Register a stream on the running loop. `admit(open streams)` runs under the table's lock first and
        may raise (a full queue) so that admission and registration are one atomic step."""
        stream = Stream(request_id, asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise InvalidInputError(f"duplicate request id {request_id!r}", param="request_id")
            if admit is not None:
                admit(len(self._streams))
            self._streams[request_id] = stream
        return stream

    def close(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def deliver(self, request_id: str, item: StepOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            _call_soon(stream.loop, _put_all, [(stream.queue, item)])

    def deliver_step(self, outputs: list[StepOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:  # else its consumer is gone
                    by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            _call_soon(loop, _put_all, items)

    def fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.values())
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for s in streams:
            by_loop.setdefault(s.loop, []).append((s.queue, error))
        for loop, items in by_loop.items():
            _call_soon(loop, _put_all, items)

    async def iterate(self, stream: Stream, on_leave: Callable[[str], None]) -> AsyncIterator[StepOutput]:
        """The consumer's side of `stream`; always unregisters it, and calls `on_leave` if it ends unfinished."""
        queue, held = stream.queue, None
        try:
            while True:
                if held is not None:  # an error queued behind outputs coalesced last time
                    item, held = held, None
                else:
                    item = await queue.get()
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
                if not item.finished and not queue.empty():
                    item, held = _coalesce(item, queue)
                if item.finished:
                    stream.finished = True
                yield item
                if item.finished:
                    return
        finally:
            if not stream.finished:  # consumer left early: generator closed or task cancelled
                on_leave(stream.request_id)
            self.close(stream.request_id)


def _coalesce(first: StepOutput, queue: asyncio.Queue) -> tuple[StepOutput, BaseException | None]:
    """`first` and the outputs queued behind it as one StepOutput: token ids and logprobs concatenated, the
    rest (finished, finish_reason, counts) of the last. Stops at the finished output, or at an exception, which
    is returned to be raised after the merged output is handed out."""
    parts = [first]
    error = None
    while not queue.empty() and not parts[-1].finished:
        nxt = queue.get_nowait()
        if isinstance(nxt, BaseException):
            error = nxt
            break
        parts.append(nxt)
    if len(parts) == 1:
        return first, error
    ids = [t for p in parts for t in p.new_token_ids]
    lps = None if all(p.logprobs is None for p in parts) else [x for p in parts for x in (p.logprobs or ())]
    tops = None if all(p.top_logprobs is None for p in parts) else \
        [x for p in parts for x in (p.top_logprobs or ())]
    prompt = next((p.prompt_logprobs for p in parts if p.prompt_logprobs is not None), None)
    return replace(parts[-1], new_token_ids=ids, logprobs=lps, top_logprobs=tops, prompt_logprobs=prompt), error


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, items: list) -> None:
    try:
        loop.call_soon_threadsafe(fn, items)
    except RuntimeError:  # its event loop is closed: nobody is waiting any more
        pass


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)
