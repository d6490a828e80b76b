"""Per-tenant share of the embedding cache: one tenant's `image_embeds` may not crowd out everyone else's.

Issue 16: ten requests of 2.4 KB of `image_embeds` each filled 770 MB of Redis and, under allkeys-lru,
evicted another tenant's entries. User-supplied embeddings are the cheap amplifier (no decode, no tower), so
PutEmbeddings charges the bytes it writes to the request's tenant, and a tenant whose writes within the last
`--tenant-cache-window-s` would pass `--tenant-cache-share` of the cache's capacity gets 429 /
RESOURCE_EXHAUSTED (`QuotaExceededError`) instead of a write; other tenants are unaffected.

Accounting lives in Redis, so every encoder replica sees the same numbers: one counter per tenant per
quarter-window (`mmpipe:v1:tenant-bytes:{<tenant>}:<bucket>`, expiring after the window; the hash tag keeps a
tenant's counters on one cluster slot). Charged first, refunded when over: two replicas racing overshoot by one
write at most. It counts recent writes, not live bytes (Redis does not report evictions per owner): an entry
evicted early still counts until its window passes, one that lives longer stops counting. Encode writes (media
sent through ingest, keyed by content and shared by every tenant) are not charged: they cost the tower's time.
Must not: block on Redis beyond the client's own timeouts, or refuse when the share is off (limit 0).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from mmpipe.shared.errors import QuotaExceededError

log = logging.getLogger(__name__)

BUCKETS = 4
KEY_PREFIX = "mmpipe:v1:tenant-bytes"


class TenantCacheShare:
    def __init__(self, redis: Any, *, limit_bytes: int, window_s: float, clock: Callable[[], float] = time.time):
        self.redis = redis
        self.limit_bytes = int(limit_bytes)
        self.window_s = float(window_s)
        self.clock = clock

    @property
    def enabled(self) -> bool:
        return self.limit_bytes > 0

    def _keys(self, tenant: str | None) -> list[str]:
        width = self.window_s / BUCKETS
        now = int(self.clock() // width)
        t = tenant or "-"  # tenants are [A-Za-z0-9._:@/+=-] (services/gateway/http/auth.py): no braces
        return [f"{KEY_PREFIX}:{{{t}}}:{b}" for b in range(now - BUCKETS + 1, now + 1)]

    def charge(self, tenant: str | None, nbytes: int) -> None:
        """Count `nbytes` about to be written for `tenant`, or raise QuotaExceededError (nothing counted)."""
        if not self.enabled or nbytes <= 0:
            return
        keys = self._keys(tenant)
        pipe = self.redis.pipeline(transaction=False)
        pipe.incrby(keys[-1], nbytes)
        pipe.expire(keys[-1], int(self.window_s) + 1)
        for k in keys[:-1]:
            pipe.get(k)
        current, _, *older = pipe.execute()
        used = int(current) + sum(int(v or 0) for v in older)
        if used > self.limit_bytes:
            self.redis.decrby(keys[-1], nbytes)
            raise QuotaExceededError(
                f"this tenant's precomputed embeddings would take {used} bytes of the embedding "
                f"cache within {self.window_s:g} s, more than its share of {self.limit_bytes} bytes "
                f"(--tenant-cache-share); retry later or send fewer / smaller image_embeds")

    def used(self, tenant: str | None) -> int:
        """Bytes charged to `tenant` within the window (metrics, tests)."""
        return sum(int(v or 0) for v in (self.redis.get(k) for k in self._keys(tenant)))


def cache_capacity_bytes(redis: Any, capacity_mb: float | None) -> int:
    """The cache's capacity: --cache-capacity-mb when given, else the Redis server's `maxmemory` (0 when it has
    none, or when CONFIG is not allowed, or for a cluster, whose nodes each have their own: set the flag)."""
    if capacity_mb:
        return int(capacity_mb * (1 << 20))
    try:
        value = redis.config_get("maxmemory")
    except Exception as e:  # noqa: BLE001 - managed Redis often disables CONFIG: the share is then off
        log.info("tenant cache share: cannot read Redis maxmemory (%s); set --cache-capacity-mb", type(e).__name__)
        return 0
    raw = value.get("maxmemory") if isinstance(value, dict) else None
    try:
        return int(raw or 0)
    except (TypeError, ValueError):
        return 0
