"""The rule for a cache that fails: it is a cache. One home, used by the in-process resolver (inputs/resolve.py).

A read that fails (the server down, a cluster node down, a timeout) is a miss for the keys it could not read,
which the caller then recomputes; a write that fails is skipped. Both are logged and counted (`stats().errors`).
A failure that is a configuration to fix, not an outage (a wrong password: `EmbeddingCache.is_outage`), is raised
as before. On a cluster only the keys of the failing node are lost: after a failed read the keys are read again
node by node (`EmbeddingCache.key_groups`), so a node that is down costs its own share of the entries.

What the caller cannot recompute (a UUID-only reference, whose embedding exists only in the cache) it must refuse
itself, with the positions `read_or_miss` reports unreachable: a retryable ServiceUnavailableError, never a
NotCachedError (the entry may well be there) and never a silent miss.

Not for the services: there the cache is also the hop from the encoder to the generator, so a key the encoder
cannot write or the generator cannot read is a retryable 503 (docs/security.md, "Faults on the new paths").
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

from ..errors import ServiceUnavailableError
from ..types import MMEmbedding
from .base import EmbeddingCache

__all__ = ["read_or_miss", "write_or_skip"]

log = logging.getLogger(__name__)


def read_or_miss(cache: EmbeddingCache, keys: Sequence[str]) -> tuple[list[MMEmbedding | None], list[int]]:
    """`cache.get_many(keys)`, and the positions that could not be read (read as misses: None)."""
    keys = list(keys)
    try:
        return cache.get_many(keys), []
    except ServiceUnavailableError as e:
        if not cache.is_outage(e):
            raise
        error = e
    out: list[MMEmbedding | None] = [None] * len(keys)
    unreachable: list[int] = []
    groups = cache.key_groups(keys)
    if len(groups) <= 1:  # one server: the failed read was the answer
        unreachable = list(range(len(keys)))
    else:
        for group in groups:
            try:
                for i, v in zip(group, cache.get_many([keys[i] for i in group])):
                    out[i] = v
            except ServiceUnavailableError as e:
                if not cache.is_outage(e):
                    raise
                error = e
                unreachable += group
    cache.record_errors(1)
    log.warning("embedding cache read of %d key(s) failed, %d read as misses and recomputed: %s", len(keys),
                len(unreachable), error)
    return out, sorted(unreachable)


def write_or_skip(cache: EmbeddingCache, items: Iterable[tuple[str, MMEmbedding]]) -> bool:
    """`cache.put_many(items)`; False (logged and counted, not raised) when the cache could not take them."""
    items = list(items)
    try:
        cache.put_many(items)
        return True
    except ServiceUnavailableError as e:
        if not cache.is_outage(e):
            raise
        cache.record_errors(len(items))
        log.warning("embedding cache write of %d item(s) failed, not cached: %s", len(items), e)
        return False
