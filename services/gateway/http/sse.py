"""Server-sent events as OpenAI streams them: `data: {json}\n\n` per chunk, then `data: [DONE]\n\n`.

A failure after the stream has started (status 200 already sent) is reported in-band as one
`data: {"error": {...}}` event (what vLLM and the `openai` client expect), then [DONE].
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from mmpipe.shared.errors import MMPipeError, openai_error_body

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(obj: BaseModel | dict[str, Any]) -> str:
    body = obj.model_dump_json(exclude_none=True) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {body}\n\n"


async def with_error_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Pass `events` through, ending with [DONE]; an error becomes one in-band error event."""
    try:
        async for e in events:
            yield e
    except MMPipeError as err:
        logger.info("stream ended with an error: %s %s", err.http_status, err.message)
        yield event(openai_error_body(err))
    yield DONE


class EventStreamResponse(StreamingResponse):
    """An SSE response that runs `on_close` however it ends: finished, failed, or the client went away
    before the first event (when the event generator never even started, so its own cleanup never runs)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]):
        super().__init__(with_error_events(events), media_type="text/event-stream", headers=HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
