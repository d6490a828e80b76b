"""--api-key: `Authorization: Bearer <key>` on every /v1 route, compared in constant time."""
from __future__ import annotations

import hmac

from fastapi import Request

from mmpipe.shared.errors import AuthenticationError


def check_api_key(expected: str | None, authorization: str | None) -> None:
    """Raise 401 unless `authorization` is `Bearer <expected>` (no key configured: everything passes)."""
    if expected is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())
    if not ok:
        raise AuthenticationError("invalid or missing API key: send `Authorization: Bearer <key>`")


def require_api_key(request: Request) -> None:
    """FastAPI dependency for the /v1 routers."""
    check_api_key(request.app.state.cfg.api_key, request.headers.get("authorization"))
