"""Which Redis a URL names, and the one place a redis-py client is built from it: one server or a cluster.

    redis://[:PASSWORD@]host:port/db, rediss://..., unix:///path.sock   one server (redis.Redis)
    redis+cluster://[:PASSWORD@]host:port[,host:port...][/0]            Redis Cluster / Valkey cluster
    rediss+cluster://...                                                 the same over TLS

A cluster URL lists seed nodes: any one that answers is enough, the client learns every node and slot from it
(CLUSTER SLOTS) and follows MOVED/ASK redirections afterwards. A cluster has only database 0. The password may
be in the URL or, better, in RedisOptions (a file or MMPIPE_REDIS_PASSWORD), exactly as for one server.

redis-py is imported only when a client is built: the gateway's `--help` stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from ..errors import InvalidInputError
from .redis_options import RedisOptions

__all__ = ["CLUSTER_SCHEMES", "ClusterURL", "is_cluster_url", "parse_cluster_url", "sync_client", "async_client",
           "redact_cluster_url"]

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def is_cluster_url(url: str) -> bool:
    return url.strip().lower().startswith(CLUSTER_SCHEMES)


@dataclass(frozen=True)
class ClusterURL:
    """A parsed redis+cluster:// URL: the seed nodes, the credentials in it, TLS or not."""

    seeds: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = None


def _bad(url: str, why: str) -> InvalidInputError:
    return InvalidInputError(f"invalid Redis Cluster URL {redact_cluster_url(url)!r}: {why}; use "
                             f"redis+cluster://host:port[,host:port]", param="redis-url")


def parse_cluster_url(url: str) -> ClusterURL:
    """Seeds and credentials of `url`; raises InvalidInputError (param redis-url) naming what is wrong."""
    s = url.strip()
    scheme, sep, rest = s.partition("://")
    if not sep or scheme.lower() not in ("redis+cluster", "rediss+cluster"):
        raise _bad(url, "the scheme must be redis+cluster:// or rediss+cluster://")
    netloc, _, path = rest.partition("/")
    path, _, _query = path.partition("?")
    if path not in ("", "0"):
        raise _bad(url, f"a cluster has only database 0, not {path!r}")
    username = password = None
    if "@" in netloc:
        cred, _, netloc = netloc.rpartition("@")
        user, colon, pw = cred.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon and pw else None
    seeds = []
    for item in netloc.split(","):
        host, colon, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _bad(url, f"seed {item.strip()!r} is not host:port")
        seeds.append((host, int(port)))
    return ClusterURL(tuple(seeds), tls=scheme.lower() == "rediss+cluster", username=username, password=password)


def redact_cluster_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" not in rest.partition("/")[0]:
        return url
    cred, _, tail = rest.partition("@")
    user = cred.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{tail}"


def _cluster_kwargs(url: str, options: RedisOptions | None) -> tuple[ClusterURL, dict[str, Any]]:
    parsed = parse_cluster_url(url)
    # RedisOptions decides password and TLS files as for one server (the scheme says whether TLS is on).
    kw = options.client_kwargs("rediss://x" if parsed.tls else "redis://x") if options is not None else {}
    if parsed.tls:
        kw["ssl"] = True
        kw.setdefault("ssl_cert_reqs", "required")
    if parsed.password:
        kw["password"] = parsed.password  # the URL wins, as redis-py does for one server
    if parsed.username:
        kw["username"] = parsed.username
    return parsed, kw


def sync_client(url: str, options: RedisOptions | None = None, **kwargs: Any) -> Any:
    """A redis-py client (`redis.Redis`, or `redis.cluster.RedisCluster` for a cluster URL) for `url`."""
    import redis

    if not is_cluster_url(url):
        kw = options.client_kwargs(url) if options is not None else {}
        return redis.Redis.from_url(url, **kw, **kwargs)
    from redis.cluster import ClusterNode, RedisCluster

    parsed, kw = _cluster_kwargs(url, options)
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in parsed.seeds], **kw, **kwargs)


def async_client(url: str, options: RedisOptions | None = None, **kwargs: Any) -> Any:
    """The asyncio counterpart of `sync_client` (the gateway's readiness check)."""
    import redis.asyncio as aioredis

    if not is_cluster_url(url):
        kw = options.client_kwargs(url) if options is not None else {}
        return aioredis.Redis.from_url(url, **kw, **kwargs)
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    parsed, kw = _cluster_kwargs(url, options)
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in parsed.seeds], **kw, **kwargs)
