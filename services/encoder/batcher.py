"""A small dynamic batcher: items from concurrent Encode calls are run through the towers together.

One queue per modality. A batch starts with the first queued item and closes when it holds
`max_items` items or `wait_ms` have passed, whichever comes first; then `run_batch(modality, items)` runs
in the (single) tower thread and each caller's future gets its own result. An item whose key is already
being encoded joins that item's future instead of being encoded twice (single flight).

The queues are bounded: with `max_queued` items waiting across all modalities, a new item is refused at once
with OverloadedError (RESOURCE_EXHAUSTED, HTTP 429 at the gateway) instead of queueing without bound.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from mmpipe.shared.errors import OverloadedError

log = logging.getLogger(__name__)


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[str, list[Any]], list[Any]], *, max_items: int, wait_ms: float,
                 executor, on_batch: Callable[[str, int, float], None] | None = None,
                 on_queue: Callable[[int], None] | None = None, max_queued: int = 1024):
        self.run_batch = run_batch
        self.max_items = max(1, max_items)
        self.wait_s = max(0.0, wait_ms) / 1000.0
        self.executor = executor
        self.on_batch = on_batch
        self.on_queue = on_queue
        self.max_queued = max(1, max_queued)
        self._queues: dict[str, asyncio.Queue] = {}
        self._workers: list[asyncio.Task] = []
        self._inflight: dict[str, asyncio.Future] = {}

    def depth(self) -> int:
        return sum(q.qsize() for q in self._queues.values())

    async def submit(self, modality: str, key: str, item: Any) -> Any:
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        if self.depth() >= self.max_queued:
            raise OverloadedError(f"the encoder queue is full ({self.max_queued} items waiting, "
                                  f"--max-queued-items); retry shortly")
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        fut.add_done_callback(lambda _f, k=key: self._inflight.pop(k, None))
        q = self._queues.get(modality)
        if q is None:
            q = self._queues[modality] = asyncio.Queue()
            self._workers.append(asyncio.create_task(self._worker(modality, q)))
        await q.put((item, fut))
        if self.on_queue:
            self.on_queue(self.depth())
        return await asyncio.shield(fut)

    async def _worker(self, modality: str, q: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await q.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_items:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(q.get(), left))
                except asyncio.TimeoutError:
                    break
            if self.on_queue:
                self.on_queue(self.depth())
            items = [b[0] for b in batch]
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, modality, items)
            except Exception as e:  # noqa: BLE001 - delivered to every caller of the batch
                results = [e] * len(items)
            if self.on_batch:
                self.on_batch(modality, len(items), time.perf_counter() - t0)
            for (_, fut), r in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(r, BaseException):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)

    async def close(self) -> None:
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
