"""Turn a cache spec from the command line or config into a cache object.

    None, "memory", "lru"          -> LRUEmbeddingCache(max_bytes)
    "redis://...", "rediss://...",
    "unix://...",
    "redis+cluster://h:p[,h:p]"    -> RedisEmbeddingCache(spec, ttl_s=..., **redis_kwargs) (a cluster: seed nodes)
    "off", "none", ""              -> None (no caching; UUID-only references then always miss)
"""
from __future__ import annotations

from typing import Any

from ..errors import InvalidInputError
from .base import EmbeddingCache
from .lru import GiB, LRUEmbeddingCache

__all__ = ["make_cache"]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


def make_cache(spec: str | None, *, max_bytes: int = 2 * GiB, ttl_s: int | None = None,
               **redis_kwargs: Any) -> EmbeddingCache | None:
    """Build the cache named by `spec`; raises InvalidInputError (param "cache") for an unknown spec.

    `max_bytes` applies to the in-process LRU; `ttl_s` and `redis_kwargs` (socket_timeout_s, namespace,
    async_queue_size, ...) to Redis. A Redis cache is returned without contacting the server: call
    `.ping()` to fail fast at startup (a cluster URL reads the slot map from a seed at once).
    """
    if spec is None:
        return LRUEmbeddingCache(max_bytes=max_bytes)
    s = spec.strip()
    low = s.lower()
    if low in ("memory", "lru"):
        return LRUEmbeddingCache(max_bytes=max_bytes)
    if low in ("off", "none", ""):
        return None
    if low.startswith(_REDIS_SCHEMES):
        from .redis_store import RedisEmbeddingCache  # local: keeps redis-py off the import path otherwise

        return RedisEmbeddingCache(s, ttl_s=ttl_s, **redis_kwargs)
    raise InvalidInputError(
        f"unknown cache spec {spec!r}: use 'memory', 'off', a redis://host:port/db URL or "
        f"redis+cluster://host:port[,host:port]", param="cache")
