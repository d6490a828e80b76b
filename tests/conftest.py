"""Shared pytest fixtures. Add new fixtures in their own clearly titled section below.

Tests that need Redis talk to a real redis-server (never fakeredis): one EmbeddedRedis per test session on
a free 127.0.0.1 port, emptied before every test that asks for `redis_url`.
"""
from __future__ import annotations

from typing import Iterator

import pytest

# --- background subprocesses (tests/background_runs.py) ----------------------------------------------------------
# The Triton-interpreter checks run in idle-priority processes started when collection ends, beside the rest of the
# suite; their tests, moved to the end of the session, then collect the results.
_BACKGROUND: list = []


@pytest.hookimpl(trylast=True)  # after -m / -k deselection
def pytest_collection_modifyitems(items):
    from background_runs import move_to_end

    move_to_end(items)


def pytest_collection_finish(session):
    from background_runs import start_selected

    if not session.config.option.collectonly:
        _BACKGROUND.extend(start_selected(session.items))


def pytest_sessionfinish(session):
    from background_runs import stop_all

    stop_all(_BACKGROUND)


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


# --- the served-stack fixtures: defined here ONLY. A session-scoped fixture imported into test modules becomes
# one fixture per module (pytest registers what each module's namespace holds), so each module started its own
# "session" stack and kept it until the session ended: ten qwen2_vl stacks alive at once by the end of the suite.
@pytest.fixture(scope="session")
def qwen2_vl_dir() -> str:
    from mmpipe.shared.models.tiny import ensure_tiny_model

    return str(ensure_tiny_model("qwen2_vl"))


@pytest.fixture(scope="session")
def qwen2_audio_dir() -> str:
    from mmpipe.shared.models.tiny import ensure_tiny_model

    return str(ensure_tiny_model("qwen2_audio"))


@pytest.fixture(scope="session")
def stage_stack(qwen2_vl_dir, redis_server):
    """ingest + encoder (--enable-mm-embeds) + generator on the tiny qwen2_vl model, one per test session.

    Ingest only fetches from example.com (so any other URL host is refused) and has no local media folder.
    Tests share its Redis and its processes: use distinct media per test when cache state matters, compare
    metrics as deltas, and never stop or kill its processes (start your own stack for fault tests)."""
    from services_helpers import start_stage_services

    stack = start_stage_services(qwen2_vl_dir, redis_server, encoder_args=["--enable-mm-embeds"],
                                 ingest_args=["--allowed-media-domains", "example.com",
                                              "--limit-mm-per-prompt", '{"image": 3}'])
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def audio_stage_stack(qwen2_audio_dir, redis_server):
    """The three stages on the tiny qwen2_audio model."""
    from services_helpers import start_stage_services

    stack = start_stage_services(qwen2_audio_dir, redis_server)
    yield stack
    stack.stop()
