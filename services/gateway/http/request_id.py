"""Request ids and request counting: one pure ASGI middleware around every HTTP request.

Takes `X-Request-Id` from the client (when sane) or makes one, logs with it, returns it in the response
header (with the worker's index under --api-server-count > 1), and counts the request by path and the status
code actually sent (including 400s from request validation and 401s, which never reach the core). Pure ASGI, not BaseHTTPMiddleware, which would break
disconnect detection of streaming responses. The stage clients forward the id in `x-request-id` metadata.
"""
from __future__ import annotations

import re
import uuid
from typing import Any

from fastapi import Request

from mmpipe.services.common.logs import REQUEST_ID

from ..metrics import count_request

HEADER = "x-request-id"
COUNTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models"})
_SANE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def new_request_id() -> str:
    return uuid.uuid4().hex


def sane_request_id(value: str | None) -> str:
    """The client's id when it is short and printable (it ends up in logs and metadata), else a new one."""
    return value if value and _SANE.fullmatch(value) else new_request_id()


WORKER_HEADER = "x-mmpipe-gateway-worker"


class RequestIdMiddleware:
    def __init__(self, app: Any, model: str, worker: int | None = None):
        self.app = app
        self.model = model
        self._extra = [(WORKER_HEADER.encode(), str(worker).encode())] if worker is not None else []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == HEADER.encode()), None)
        rid = sane_request_id(given)
        scope.setdefault("state", {})["request_id"] = rid
        token = REQUEST_ID.set(rid)

        status = [499]  # nothing sent: the client went away first

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), (HEADER.encode(), rid.encode()), *self._extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
            path = scope.get("path", "")
            if path.startswith("/v1/"):  # unknown paths share one label value: bounded cardinality
                count_request(self.model, path if path in COUNTED_PATHS else "/v1/other", status[0])


def request_id(request: Request) -> str:
    """FastAPI dependency: the id the middleware chose."""
    return request.state.request_id
