"""The request's session for `--routing-logic session`: the value of the `--session-key` header (None without
the flag or the header). Only hashed onto a generator replica (services/gateway/routing.py), never stored."""
from __future__ import annotations

from fastapi import Request


def request_session(request: Request) -> str | None:
    key = request.app.state.cfg.routing.session_key
    return request.headers.get(key) if key else None
