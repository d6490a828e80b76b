"""Shared pytest fixtures. Add new fixtures in their own clearly titled section below.

Tests that need Redis talk to a real redis-server (never fakeredis): one EmbeddedRedis per test session on
a free 127.0.0.1 port, emptied before every test that asks for `redis_url`.
"""
from __future__ import annotations

from typing import Iterator

import pytest

# --- Redis -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """URL of a session-wide redis-server (256 MB, allkeys-lru). Prefer `redis_url`, which starts empty."""
    from mmpipe.shared.cache.embedded_redis import EmbeddedRedis

    with EmbeddedRedis(maxmemory="256mb", policy="allkeys-lru") as srv:
        yield srv.url


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The session server's URL, with its data flushed before the test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    try:
        client.flushall()
        yield redis_server
    finally:
        client.close()
