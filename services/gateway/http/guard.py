"""What every /v1 request passes before its body is read: the API key, the concurrency slot, the body cap and
the body deadline. One pure ASGI middleware, innermost around the app.

Order, cheapest refusal first (issue 16: a 300 MB body without a key used to be read and parsed before the 401):
  1. authenticate on the headers (401; the tenant goes to scope state for `require_api_key`);
  2. a generation request takes its --max-concurrent-requests slot (429), before the body is read or parsed,
     and gives it back when the response has been sent;
  3. Content-Length above --max-request-body-mb is a 413 at once; the body is then read in chunks under the
     same cap (chunked uploads: 413 as soon as the cap is passed) and within --body-read-timeout (408);
  4. a body whose JSON strings hold lone UTF-16 surrogates (invalid Unicode) is a 400 naming the field;
  5. the app gets the buffered body, and the transport's `receive` after it (disconnect detection).
Every refusal here closes the connection (`Connection: close`): whatever the client still sends is not read.
Slow headers are the connection's business (connections.py); this module never sees them.
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from starlette.datastructures import Headers

from mmpipe.shared.errors import ClientTimeoutError, InvalidInputError, MMPipeError, RequestTooLargeError

from ..metrics import CONNECTIONS_CUT
from .auth import authenticate_headers
from .errors import error_response

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
MiB = 1 << 20


class RequestGuard:
    def __init__(self, app: Any, core: Any):
        self.app = app
        self.core = core
        self.cfg = core.cfg
        self.max_body = int(self.cfg.max_request_body_mb * MiB)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        headers = Headers(scope=scope)
        admit = scope.get("method") == "POST" and scope["path"] in GENERATION_PATHS
        try:
            state["tenant"] = authenticate_headers(self.cfg, headers)
            if admit:
                self.core.admit()
        except MMPipeError as e:
            return await _refuse(e, scope, receive, send)
        state["admitted"] = admit
        try:
            try:
                body = await self._read_body(headers, receive)
            except MMPipeError as e:
                return await _refuse(e, scope, receive, send)
            if body is None:
                return  # the client went away while sending
            if _SURROGATE_ESCAPE.search(body):
                bad = _lone_surrogate_field(body)
                if bad is not None:
                    return await _refuse(InvalidInputError(
                        f"{bad or 'the body'}: a string holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape "
                        f"without its pair), which is not valid Unicode", param=bad or "body"), scope, receive, send)
            await self.app(scope, _replay(body, receive), send)
        finally:
            if admit:
                self.core.release()

    async def _read_body(self, headers: Headers, receive: Any) -> bytes | None:
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise InvalidInputError("the Content-Length header is not a number", param="content-length")
            if int(declared) > self.max_body:
                CONNECTIONS_CUT.labels("body_too_large").inc()
                raise RequestTooLargeError(self._too_large(int(declared)), param="body")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.cfg.body_read_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        CONNECTIONS_CUT.labels("body_too_large").inc()
                        raise RequestTooLargeError(self._too_large(size, read=True), param="body")
                    if chunk:
                        chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            CONNECTIONS_CUT.labels("body_timeout").inc()
            raise ClientTimeoutError(f"the request body was not received within {self.cfg.body_read_timeout_s:g} s "
                                     f"(--body-read-timeout)", param="body") from None

    def _too_large(self, size: int, read: bool = False) -> str:
        return (f"the request body is {'more than ' if read else ''}{size} bytes, more than the limit of "
                f"{self.max_body} bytes (--max-request-body-mb {self.cfg.max_request_body_mb:g})")


# JSON may spell a lone surrogate as an escape (`"\ud800"`): json.loads accepts it, and the str then fails
# wherever it is encoded (the tokenizer, the JSON of the error that echoes it): a 500. Only bodies that contain
# such an escape at all are parsed a second time, here, to find the field.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate_field(body: bytes) -> str | None:
    """The path of the first key or string value holding a lone surrogate ("" for the top level), or None."""
    try:
        value = json.loads(body)
    except ValueError:
        return None  # not JSON: the route reports that itself

    def bad(s: str) -> bool:
        try:
            s.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True

    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if bad(v):
                return path
        elif isinstance(v, dict):
            for k, item in v.items():
                where = f"{path}.{k}" if path else str(k)
                if bad(k):
                    return path or ""
                stack.append((where, item))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(v))
    return None


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that hands out the buffered body once, then the transport's own messages (disconnects)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(err: MMPipeError, scope: dict, receive: Any, send: Any) -> None:
    response = error_response(err)
    response.headers["connection"] = "close"  # the rest of the body is never read
    await response(scope, receive, send)


def request_admitted(request: Any) -> bool:
    """Whether the guard holds this request's --max-concurrent-requests slot (then the core takes none)."""
    return bool(request.scope.get("state", {}).get("admitted", False))
