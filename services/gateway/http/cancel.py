"""Cancel a request's work when its HTTP client goes away (vLLM's `with_cancellation`).

FastAPI keeps running a handler after the client has disconnected; for an LLM request that wastes a batch
slot for the whole generation. `until_disconnect` races the handler against the ASGI `http.disconnect`
message and cancels it, which closes its GenerationStream and so cancels the generator call.
Streaming responses are covered by Starlette itself once they have started.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response

T = TypeVar("T")


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # its cancellation or its error: nobody is listening any more
        pass
    return Response(status_code=499)
