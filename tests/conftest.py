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


# --- Redis Cluster -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_cluster():
    """A session-wide 3-node Redis Cluster on free 127.0.0.1 ports (tests/redis_cluster_helpers.py)."""
    from redis_cluster_helpers import EmbeddedRedisCluster

    with EmbeddedRedisCluster() as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster):
    """The session cluster's redis+cluster:// URL, every node emptied before the test."""
    redis_cluster.wait_ok()
    for i in range(redis_cluster.n):
        c = redis_cluster.client(i)
        c.flushall()
        c.close()
    return redis_cluster.url
