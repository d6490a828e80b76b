"""Who is asking: `Authorization: Bearer <key>` on every /v1 route and on the gRPC API, and the request's tenant.

Keys (--api-key, a comma-separated list, and --api-key-file) are compared in constant time: the presented
token and every configured key are first hashed to 32 bytes, then compared with `hmac.compare_digest`, against
every key without an early exit, so neither a key's length nor which key matched shows in the timing.

The tenant namespaces UUID-keyed cache entries (docs/security.md, "Isolation"):
  * with --trust-tenant-header, the `X-MMPipe-Tenant` header when present (a trusted proxy sets it);
  * else, with API keys, a stable id derived from the matched key: blake3 in key-derivation mode, so the id
    reveals nothing of the key, is the same on every gateway replica, and needs no shared secret;
  * else None: the single default tenant (shared with the offline `LLM`).
"""
from __future__ import annotations

import hmac
import re
from collections.abc import Sequence

import blake3
from fastapi import Request

from mmpipe.shared.errors import AuthenticationError, InvalidInputError

TENANT_HEADER = "x-mmpipe-tenant"
_KEY_ID_CONTEXT = "mmpipe 2025 gateway api-key tenant id v1"
_KEY_DIGEST_CONTEXT = "mmpipe 2025 gateway api-key comparison v1"
_SANE_TENANT = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def _digest(s: str) -> bytes:
    return blake3.blake3(s.encode("utf-8"), derive_key_context=_KEY_DIGEST_CONTEXT).digest()


def tenant_of_key(key: str) -> str:
    """The tenant id of an API key: 128 bits of a keyed-derivation hash, never the key itself."""
    return "key-" + blake3.blake3(key.encode("utf-8"), derive_key_context=_KEY_ID_CONTEXT).hexdigest()[:32]


def match_api_key(keys: Sequence[str], token: str) -> str | None:
    """The configured key equal to `token`, or None. Constant time in the token and in the keys."""
    presented = _digest(token)
    found = None
    for k in keys:  # no early exit: every key costs the same whether or not an earlier one matched
        if hmac.compare_digest(presented, _digest(k)):
            found = k
    return found


def check_api_key(expected: str | Sequence[str] | None, authorization: str | None) -> str | None:
    """Raise 401 unless `authorization` is `Bearer <one of expected>`; return the matched key (None when no key
    is configured: everything passes)."""
    keys = (expected,) if isinstance(expected, str) else tuple(expected or ())
    if not keys:
        return None
    scheme, _, token = (authorization or "").partition(" ")
    key = match_api_key(keys, token.strip())
    if scheme.lower() != "bearer" or key is None:
        raise AuthenticationError("invalid or missing API key: send `Authorization: Bearer <key>`")
    return key


def authenticate(cfg, authorization: str | None, tenant_header: str | None) -> str | None:
    """Check the API key (401) and return the request's tenant (None: the default tenant)."""
    key = check_api_key(cfg.all_api_keys, authorization)
    if cfg.trust_tenant_header and tenant_header is not None:
        if not _SANE_TENANT.fullmatch(tenant_header):
            raise InvalidInputError(f"the {TENANT_HEADER} header must be 1-128 characters of "
                                    f"[A-Za-z0-9._:@/+=-]", param=TENANT_HEADER)
        return "hdr-" + tenant_header
    return tenant_of_key(key) if key is not None else None


def authenticate_headers(cfg, headers) -> str | None:
    """`authenticate` on a request's headers (a Starlette `Headers`, or anything with `.get`)."""
    return authenticate(cfg, headers.get("authorization"), headers.get(TENANT_HEADER))


def require_api_key(request: Request) -> None:
    """FastAPI dependency for the /v1 routers: 401 without a valid key; the tenant goes to request.state.
    The HTTP guard (guard.py) has normally authenticated already, on the headers, before the body was read."""
    if "tenant" not in request.scope.get("state", {}):
        request.state.tenant = authenticate_headers(request.app.state.cfg, request.headers)


def request_tenant(request: Request) -> str | None:
    """The tenant `require_api_key` found for this request."""
    return getattr(request.state, "tenant", None)
