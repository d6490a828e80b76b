"""n > 1: one request's samples as n engine requests (vLLM v1's ParentRequest), and back.

Sample i is an EngineRequest of its own, `{i}_{request_id}`, with SamplingParams.child(i) (n = 1, seed + i when
seeded). The children are handed to the engine together, so the first one's admission registers the prompt's
full KV blocks in the prefix cache in the step that computes them and the others take those blocks (ref-counted)
instead of computing them again: the prompt is prefilled once, except the last, partial block, which each sample
writes its own tokens into. With n == 1 the request is passed on unchanged (same id).

Used by the offline LLM and the generator service (which merges the samples' streams with `merge_streams`,
each chunk tagged with its index); the engine itself only ever sees n == 1.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import TypeVar

from mmpipe.shared.types import EngineRequest

T = TypeVar("T")


def child_requests(req: EngineRequest) -> list[EngineRequest]:
    n = req.sampling.n
    if n == 1:
        return [req]
    return [dataclasses.replace(req, request_id=child_id(req.request_id, i), sampling=req.sampling.child(i))
            for i in range(n)]


def child_id(request_id: str, index: int) -> str:
    return f"{index}_{request_id}"


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of several async iterators as they come (the samples of one request, each in its own task).

    The first error of any of them is raised here; leaving early (or an error) cancels the others, which closes
    them in their own tasks (so an engine stream aborts its request there)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((item, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer, which raises it
            await queue.put((None, e))
        finally:
            await queue.put((done, None))

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    left = len(tasks)
    try:
        while left:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                left -= 1
                continue
            yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
