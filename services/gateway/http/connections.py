"""The gateway's HTTP connections: uvicorn's h11 protocol with a header deadline, and connection metrics.

uvicorn times out only idle keep-alive connections, and any byte received cancels that timer, so a client
sending its request line and headers one byte a second held a connection (and a file descriptor) for as long
as it liked (issue 16). Here every request's headers must be complete within --header-read-timeout of the
connection opening or of the previous response ending; otherwise the client gets a 408 and the connection is
closed. The header size is h11's limit (16 KiB, uvicorn's `h11_max_incomplete_event_size`). Bodies are the
guard's business (guard.py: cap and --body-read-timeout).
Metrics: connections accepted, open now, and cut (by reason).
"""
from __future__ import annotations

import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..metrics import CONNECTIONS, CONNECTIONS_CUT, OPEN_CONNECTIONS


def _timeout_response(timeout_s: float) -> bytes:
    body = json.dumps({"error": {"message": f"the request headers were not received within {timeout_s:g} s "
                                            f"(--header-read-timeout)", "type": "invalid_request_error",
                                 "param": None, "code": 408}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def guarded_h11(header_timeout_s: float, model: str) -> type[H11Protocol]:
    """uvicorn's h11 protocol class (its `http=` setting) with a `header_timeout_s` deadline on headers."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            CONNECTIONS.labels(model).inc()
            OPEN_CONNECTIONS.labels(model).inc()
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            OPEN_CONNECTIONS.labels(model).dec()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a whole request head has arrived
                self._disarm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # keep-alive: the next request's headers get the same deadline
                self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            CONNECTIONS_CUT.labels("header_timeout").inc()
            if self.conn.our_state is h11.IDLE:  # nothing sent on this request yet: say why, then close
                self.transport.write(_timeout_response(header_timeout_s))
            self.transport.close()

    return GuardedH11Protocol
