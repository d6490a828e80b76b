"""The embedding-cache interface every backend implements (in-process LRU, Redis).

Keys come from `CacheKeyspace.key(...)`; values are `MMEmbedding`s. Backends differ in where the bytes
live, not in behaviour: a miss, an expired entry, an evicted entry and a corrupt entry all read as None.
"""
from __future__ import annotations

import abc
import threading
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

from ..types import MMEmbedding

__all__ = ["CacheStats", "EmbeddingCache"]


@dataclass
class CacheStats:
    """Counters since the cache object was created (per client object, not per server).

    `entries` and `evictions` come from the backend when it can tell (None otherwise); for Redis they are
    server-wide numbers (DBSIZE of the selected db, INFO evicted_keys), shared by every replica.
    """

    hits: int = 0
    misses: int = 0
    puts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    entries: int | None = None
    evictions: int | None = None
    corrupt: int = 0  # entries that failed validation, were dropped and read as misses
    errors: int = 0  # failed background writes and other swallowed backend errors
    dropped: int = 0  # background writes discarded because the write queue was full
    pending: int = 0  # background writes queued but not yet written
    bytes_used: int | None = None  # bytes held (LRU) or used_memory of the server (Redis)
    max_bytes: int | None = None

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        return d


class EmbeddingCache(abc.ABC):
    """Abstract embedding cache. Implementations are thread-safe.

    Returned embeddings may share tensor memory with the cache (LRU) or with the received payload
    (Redis): treat them as read-only and clone before modifying in place.
    """

    # --- reads -------------------------------------------------------------------------------------
    def get(self, key: str) -> MMEmbedding | None:
        return self.get_many([key])[0]

    @abc.abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[MMEmbedding | None]:
        """One result per key, in order; None for a miss."""

    @abc.abstractmethod
    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is present, without transferring values (counts neither hit nor miss)."""

    def exists(self, key: str) -> bool:
        return self.exists_many([key])[0]

    # --- writes ------------------------------------------------------------------------------------
    def put(self, key: str, emb: MMEmbedding) -> None:
        self.put_many([(key, emb)])

    @abc.abstractmethod
    def put_many(self, items: Iterable[tuple[str, MMEmbedding]]) -> None:
        """Store every (key, embedding); an existing entry under the same key is replaced."""

    def put_async(self, key: str, emb: MMEmbedding) -> None:
        """Store without making the caller wait for the backend. Default: a synchronous put.

        Backends with slow writes (Redis) override this with a background writer; the tensor must not be
        modified afterwards. Failures are counted in `stats().errors`, never raised.
        """
        self.put(key, emb)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every `put_async` issued so far is written; False if `timeout_s` ran out first."""
        return True

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key` if present."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Remove every entry this cache owns."""

    # --- failures (shared/cache/best_effort.py degrades with these) ----------------------------------
    def key_groups(self, keys: Sequence[str]) -> list[list[int]]:
        """Positions of `keys` grouped by the server that holds them, so that one that is down costs its own keys
        only; local, no network. Default: one group (one server, or an in-process cache)."""
        return [list(range(len(keys)))] if keys else []

    def is_outage(self, error: Exception) -> bool:
        """Whether `error` (from a read or write) is the backend being away, which a caller may ride out, rather
        than a configuration to fix (a wrong password), which it must not hide. Default: every error."""
        return True

    def record_errors(self, n: int) -> None:
        """Count `n` backend errors a caller swallowed (stats().errors). Default: nothing to count."""

    # --- bookkeeping -------------------------------------------------------------------------------
    @abc.abstractmethod
    def stats(self) -> CacheStats:
        ...

    def close(self) -> None:
        """Release connections / threads. Idempotent."""

    def __enter__(self) -> "EmbeddingCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Counters:
    """Thread-safe counter block shared by the implementations."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hits = self.misses = self.puts = 0
        self.bytes_read = self.bytes_written = 0
        self.corrupt = self.errors = self.dropped = 0

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self, **extra: Any) -> CacheStats:
        with self.lock:
            return CacheStats(hits=self.hits, misses=self.misses, puts=self.puts, bytes_read=self.bytes_read,
                              bytes_written=self.bytes_written, corrupt=self.corrupt, errors=self.errors,
                              dropped=self.dropped, **extra)
