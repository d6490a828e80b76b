"""Server-sent events as OpenAI streams them: `data: {json}\n\n` per chunk, then `data: [DONE]\n\n`.

A failure after the stream has started (status 200 already sent) is reported in-band as one
`data: {"error": {...}}` event (what vLLM and the `openai` client expect), then [DONE].

Stream chunks are the hot path (one per generated token or text delta), so they are not pydantic models:
`ChunkEvents` keeps the chunk's constant head (id, object, created, model) as prebuilt JSON text and encodes
only the choice dict of each event, in the field order and with the omissions (no null fields) of the
pydantic models' `model_dump_json(exclude_none=True)`, which the non-streaming responses still use.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from mmpipe.shared.errors import MMPipeError, openai_error_body

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# Compact separators and raw UTF-8, as pydantic writes JSON; one encoder object, not one per call.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
dumps = _JSON.encode


def event(obj: BaseModel | dict[str, Any]) -> str:
    body = obj.model_dump_json(exclude_none=True) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {body}\n\n"


def finite(x: float) -> float | None:
    """A float as pydantic serialises it: inf and NaN are not JSON, they become null."""
    return x if math.isfinite(x) else None


class ChunkEvents:
    """The SSE events of one stream: `{"id", "object", "created", "model", "choices": [...], ...}` per chunk."""

    __slots__ = ("_head",)

    def __init__(self, id: str, object: str, created: int, model: str):
        self._head = (f'data: {{"id":{dumps(id)},"object":{dumps(object)},"created":{int(created)},'
                      f'"model":{dumps(model)},"choices":[')

    def event(self, choice: dict[str, Any] | None, *, usage: dict[str, int] | None = None,
              prompt_token_ids: list[int] | None = None) -> str:
        """One event with one choice (None: `choices: []`) and the optional top-level tail fields."""
        out = self._head + (dumps(choice) if choice is not None else "") + "]"
        if usage is not None:
            out += ',"usage":' + dumps(usage)
        if prompt_token_ids is not None:
            out += ',"prompt_token_ids":' + dumps(prompt_token_ids)
        return out + "}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object (the shape of protocol.UsageInfo.of)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


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
