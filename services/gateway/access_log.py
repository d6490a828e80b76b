"""The gateway's access log: one line per request, HTTP and the public gRPC API, written when the request ends.

Each line (logger `mmpipe.access`, through the one logging setup, services/common/logs.py) carries method, path,
status, latency_ms, prompt_tokens and completion_tokens (when the request generated) and request_id. A stream is
logged once it has ended, so its latency is the whole stream's. uvicorn's own access log is off (server.py), so
there is one line per request; `--disable-access-log` (vLLM: `--disable-uvicorn-access-log`) turns these off,
`--disable-access-log-for-endpoints /health,/metrics` skips those paths.

Token counts reach the line through a contextvar holding the request's `AccessEntry`: the transport opens the
entry, `RequestMetrics.finish` (the one place a request's token totals are final) fills them in, the transport
writes the line. Child tasks copy the context, so a stream's cleanup in another task fills the same entry.
"""
from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("mmpipe.access")

_ENTRY: contextvars.ContextVar[AccessEntry | None] = contextvars.ContextVar("mmpipe_access_entry", default=None)


@dataclass(slots=True)
class AccessEntry:
    method: str  # the HTTP method, or "GRPC"
    path: str  # the HTTP path, or /mmpipe.v1.Gateway/<Method>
    start: float = field(default_factory=time.perf_counter)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def record_tokens(prompt_tokens: int, completion_tokens: int) -> None:
    """The current request's token totals (a no-op outside a logged request)."""
    entry = _ENTRY.get()
    if entry is not None:
        entry.prompt_tokens, entry.completion_tokens = prompt_tokens, completion_tokens


class AccessLog:
    """Opens and writes the entries of one gateway process (its config: on/off and the paths left out)."""

    def __init__(self, enabled: bool = True, exclude: tuple[str, ...] = ()):
        self.enabled = enabled
        self.exclude = frozenset(exclude)

    @classmethod
    def of(cls, cfg: Any) -> AccessLog:
        """From the GatewayConfig's --disable-access-log / --disable-access-log-for-endpoints."""
        return cls(cfg.access_log, cfg.access_log_exclude)

    def open(self, method: str, path: str) -> tuple[AccessEntry, contextvars.Token] | None:
        """Start timing a request and make it current; None when it is not logged."""
        if not self.enabled or path in self.exclude:
            return None
        entry = AccessEntry(method, path)
        return entry, _ENTRY.set(entry)

    def close(self, opened: tuple[AccessEntry, contextvars.Token] | None, status: int | str,
              request_id: str | None) -> None:
        """Write the request's line and forget it."""
        if opened is None:
            return
        entry, token = opened
        _ENTRY.reset(token)
        fields: dict[str, Any] = {"method": entry.method, "path": entry.path, "status": status,
                                  "latency_ms": round((time.perf_counter() - entry.start) * 1000, 1)}
        if entry.prompt_tokens is not None:
            fields["prompt_tokens"] = entry.prompt_tokens
            fields["completion_tokens"] = entry.completion_tokens
        logger.info("access", extra={**fields, "request_id": request_id})


class AccessLogMiddleware:
    """Pure ASGI (a streaming response is logged when its last byte is sent), outside the request-id middleware,
    whose id it reads back from the request scope."""

    def __init__(self, app: Any, access_log: AccessLog):
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        opened = self.access_log.open(scope.get("method", ""), scope.get("path", ""))
        if opened is None:
            return await self.app(scope, receive, send)
        status: list[int | None] = [None]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status[0] = status[0] or 500  # the error handler outside this middleware answers 500
            raise
        finally:
            if status[0] is None:
                status[0] = 499  # nothing sent: the client went away first
            self.access_log.close(opened, status[0], scope.get("state", {}).get("request_id"))
