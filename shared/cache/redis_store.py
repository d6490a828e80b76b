"""Embedding cache in Redis, shared by every encoder/generator replica that points at the same server.

Values are `serde.pack_embedding` payloads (checksummed header + raw tensor bytes).

Write path, and why it is not a plain `redis.Redis().set(key, value)`: with hiredis installed, redis-py
packs every command with `hiredis.pack_command`, which copies the whole 4.7 MB value (profiled: 5 ms of
a 6.6 ms SET). With bench/cache_bench.py (16 distinct 4.7 MB values, 2-core machine) a default redis-py
SET took 3.6 ms median / 6.4 ms p90, the pure-Python packer, which hands large arguments to `sendall`
untouched, 0.95 / 1.2 ms. This module therefore
  * configures its connection pool with the pure-Python packer (hiredis still parses replies), and
  * writes SETs itself on a pooled connection: the RESP header, the payload header and a memoryview of the
    tensor go out with `send_packed_command`, so the tensor is never concatenated or copied (joining
    header and tensor into one `bytes` alone cost 1.0 ms median, 2.5 ms p90, mostly page faults on
    fresh memory), and several SETs are pipelined into one round trip for `put_many` and the writer.
Numbers for each variant: `bench/cache_bench.py`.

`put_async` queues writes for a background thread (bounded by item count and bytes; when full, writes
are dropped and counted, because blocking the encoder would put the cache back on the request's
critical path). `flush()` waits for the queue.

Redis Cluster / Valkey cluster (`redis+cluster://host:port[,host:port]`, shared/cache/redis_urls.py): redis-py's
RedisCluster knows the slot map; every key is routed to the node serving its slot, writes are pipelined per
node, and reads are one pipeline of MGETs per node with each MGET inside one slot (a cross-slot MGET is an error
in a cluster), answers put back in the caller's order. An entry is one key (header and tensor in one value), so
no operation needs several keys in one slot and keys carry no hash tag: entries spread over every node (and a
client-chosen UUID, percent-escaped by keys.py, cannot contain the `{` of a hash tag to pile entries onto one
node). A MOVED/ASK/CLUSTERDOWN answer or a dropped node connection refreshes the slot map and retries once; a node
that stays down makes the operation fail as a down single server does (ServiceUnavailableError), and a node that
comes back empty gives misses: a value is only ever served from the key it was written under, checksummed.

Reads use MGET (in chunks, so one huge reply can't balloon the server's output buffer), received by a
small RESP reader straight into one torch buffer per value rather than through hiredis (which copies a
large value two or three times): the embedding is then a zero-copy, writable view of that buffer. Every
value is validated by `unpack_embedding`; a corrupt value is deleted, counted and reported as a miss,
never served. An evicted or expired entry is simply absent: a miss.
"""
from __future__ import annotations

import collections
import logging
import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis
import torch
from redis.backoff import NoBackoff
from redis.connection import Encoder, PythonRespSerializer
from redis.retry import Retry

from ..errors import InvalidInputError, ServiceUnavailableError
from ..types import MMEmbedding
from .base import CacheStats, EmbeddingCache, _Counters
from .lru import embedding_nbytes
from .redis_options import RedisOptions
from .redis_urls import is_cluster_url, redact_cluster_url, sync_client
from .serde import CacheCorruptError, CacheVersionError, pack_embedding_parts, payload_nbytes, unpack_embedding

__all__ = ["RedisEmbeddingCache", "redact_url"]

log = logging.getLogger(__name__)

MiB = 1 << 20
_MGET_CHUNK = 16  # keys per MGET: 16 x 9.3 MB (a large Qwen2-VL image) is ~150 MB of reply at most
_COALESCE_MAX = 64 * 1024  # small RESP pieces are joined; larger buffers go to sendall as they are
_BATCH_MAX_BYTES = 64 * MiB  # bytes per pipelined write batch of the background writer


def redact_url(url: str) -> str:
    """`url` with any password replaced by ***, for error messages and logs."""
    if is_cluster_url(url):
        return redact_cluster_url(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _coalesce(chunks: Iterable[Any]) -> list[Any]:
    """Join neighbouring small pieces so a pipelined write is a few large sendall calls."""
    out: list[Any] = []
    small: list[bytes] = []
    size = 0
    for c in chunks:
        n = memoryview(c).nbytes
        if n <= _COALESCE_MAX:
            small.append(bytes(c))
            size += n
            if size > _COALESCE_MAX:
                out.append(b"".join(small))
                small, size = [], 0
        else:
            if small:
                out.append(b"".join(small))
                small, size = [], 0
            out.append(c)
    if small:
        out.append(b"".join(small))
    return out


def _packer() -> PythonRespSerializer:
    # See the module docstring: the pure-Python packer does not copy large values.
    return PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


# Cluster answers after which the slot map is stale (or the cluster settling): refresh it and retry once.
_REROUTE_ERRORS = ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")


def _needs_reroute(e: BaseException) -> bool:
    c = e.__cause__ if isinstance(e, ServiceUnavailableError) else e
    if isinstance(c, redis.exceptions.AuthenticationError):
        return False
    if isinstance(c, (redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.ClusterDownError,
                      redis.exceptions.TryAgainError)):  # redis-py's parser turns the replies into these
        return True
    if isinstance(c, redis.exceptions.ResponseError):  # _BulkReader's: the reply's text
        return str(c).startswith(_REROUTE_ERRORS)
    return isinstance(c, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError))


class _BulkReader:
    """Reads RESP replies straight off a socket, placing each bulk string in its own torch buffer.

    Why not the hiredis parser: it receives into a buffer, appends into its own growing buffer and then
    copies into a `bytes`. For a 4.7 MB value a plain GET measured 2.0-2.1 ms through redis-py against
    1.45-1.8 ms received directly into the final (writable, 64-byte aligned) tensor memory, and
    `get` end to end (with checksum) 2.4-2.5 ms against 2.7-2.9 ms (bench/cache_bench.py, interleaved).
    Only the reply shapes MGET produces are understood: an array of bulk strings / nulls (RESP2 or
    RESP3), or an error.
    """

    __slots__ = ("sock", "buf", "start", "end")

    def __init__(self, sock: Any):
        self.sock = sock
        self.buf = bytearray(64 * 1024)
        self.start = self.end = 0

    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):
            rest = self.end - self.start
            self.buf[:rest] = self.buf[self.start:self.end]
            self.start, self.end = 0, rest
            if rest == len(self.buf):
                raise redis.exceptions.InvalidResponse("RESP line longer than 64 KiB")
        n = self.sock.recv_into(memoryview(self.buf)[self.end:])
        if not n:
            raise redis.exceptions.ConnectionError("connection closed by the server")
        self.end += n

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.start, self.end)
            if i >= 0:
                out = bytes(self.buf[self.start:i])
                self.start = i + 2
                return out
            self._fill()

    def read_into(self, mv: memoryview) -> None:
        """Fill `mv` exactly: first from what is buffered, then by receiving into `mv` itself."""
        n = len(mv)
        have = min(self.end - self.start, n)
        if have:
            mv[:have] = self.buf[self.start:self.start + have]
            self.start += have
        while have < n:
            got = self.sock.recv_into(mv[have:])
            if not got:
                raise redis.exceptions.ConnectionError("connection closed by the server")
            have += got

    def _skip(self, head: bytes) -> None:
        """Consume one RESP value whose first line is `head` (used for out-of-band RESP3 frames)."""
        t = head[:1]
        if t in (b"$", b"=", b"!"):
            n = int(head[1:])
            if n >= 0:
                self.read_into(memoryview(bytearray(n + 2)))
        elif t in (b"*", b">", b"~", b"%", b"|"):
            n = int(head[1:])
            for _ in range(max(n, 0) * (2 if t in (b"%", b"|") else 1)):
                self._skip(self.line())
        # every other type (+ - : _ , # ( ) is a single line, already consumed

    def bulk_array(self) -> list[torch.Tensor | None]:
        head = self.line()
        # RESP3 may put push frames (">", e.g. maintenance notifications) or attributes ("|") before
        # the reply; they are not ours to interpret here.
        while head[:1] in (b">", b"|"):
            self._skip(head)
            head = self.line()
        if head[:1] == b"-":
            raise redis.exceptions.ResponseError(head[1:].decode("utf-8", "replace"))
        if head[:1] != b"*":
            raise redis.exceptions.InvalidResponse(f"expected an array reply, got {head[:40]!r}")
        out: list[torch.Tensor | None] = []
        for _ in range(int(head[1:])):
            item = self.line()
            if item == b"_" or item == b"$-1":  # RESP3 / RESP2 null: a miss
                out.append(None)
                continue
            if item[:1] != b"$":
                raise redis.exceptions.InvalidResponse(f"expected a bulk string, got {item[:40]!r}")
            n = int(item[1:])
            t = torch.empty(n, dtype=torch.uint8)
            if n:
                self.read_into(memoryview(t.numpy()))
            crlf = bytearray(2)
            self.read_into(memoryview(crlf))
            if crlf != b"\r\n":
                raise redis.exceptions.InvalidResponse("bulk string not terminated by CRLF")
            out.append(t)
        return out


class RedisEmbeddingCache(EmbeddingCache):
    """Embedding cache on a Redis server (`redis://[:password@]host:port/db`, `rediss://`, `unix://`) or a Redis /
    Valkey cluster (`redis+cluster://host:port[,host:port]`, `rediss+cluster://`).

    ttl_s: expiry of every entry (None: entries live until evicted by the server's maxmemory policy).
    socket_timeout_s: per-operation socket timeout; connect_timeout_s defaults to it.
    namespace: `clear()` deletes only keys starting with "<namespace>:" (see CacheKeyspace).
    async_queue_size / async_max_pending_bytes: bounds of the `put_async` queue.
    verify: check each value's blake3 checksum on read (about 0.3 ms per 4.7 MB).
    options: a `RedisOptions` (AUTH password from a file or MMPIPE_REDIS_PASSWORD, TLS CA / client cert for
        rediss:// URLs); a password in the URL wins over it.
    raw_reads: receive MGET replies with `_BulkReader` on the pooled connection's socket (default);
        False reads through redis-py's parser instead: slower for big values, but independent of
        redis-py internals (it relies on the private `Connection._sock`), should a future version move it.
    """

    def __init__(self, url: str, *, ttl_s: int | None = None, socket_timeout_s: float = 5.0,
                 connect_timeout_s: float | None = None, namespace: str = "mmpipe",
                 max_connections: int | None = None, async_queue_size: int = 64,
                 async_max_pending_bytes: int = 512 * MiB, verify: bool = True, raw_reads: bool = True,
                 options: RedisOptions | None = None):
        if ttl_s is not None and (not isinstance(ttl_s, int) or ttl_s <= 0):
            raise InvalidInputError(f"ttl_s must be a positive int or None, got {ttl_s!r}", param="ttl_s")
        if not namespace or any(c in namespace for c in "*?[]\\:"):
            raise InvalidInputError(f"invalid cache namespace {namespace!r}", param="namespace")
        self.url = url
        self.safe_url = redact_url(url)
        self.ttl_s = ttl_s
        self.namespace = namespace
        self.verify = verify
        self.raw_reads = raw_reads
        common: dict[str, Any] = dict(
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s if connect_timeout_s is None else connect_timeout_s,
            # One immediate retry covers a pooled connection the server closed (restart, idle
            # timeout); redis-py's default of several retries with backoff would turn "Redis is down"
            # into seconds of waiting on every request.
            retry=Retry(NoBackoff(), 1),
            max_connections=max_connections,
            # For replies the hiredis parser still reads (EXISTS, INFO, raw_reads=False): 1 MiB
            # socket reads instead of 64 KiB cut a 4.7 MB GET from ~3.5 to ~2 ms here.
            socket_read_size=1 << 20)
        self._cluster: Any = None
        self._pool: Any = None
        if is_cluster_url(url):
            # No packer to set: large values never go through redis-py's packer (`_write_on` sends its own RESP).
            if max_connections is None:
                common.pop("max_connections")
            # Contacts a seed now (the slot map): an unreachable cluster fails here, as ping() does.
            with self._errors("CLUSTER SLOTS"):
                self._cluster = sync_client(url, options, **common)
            self._r = self._cluster
        else:
            # AUTH password (kept out of the URL) and TLS files: see redis_options.py
            conn_kw = options.client_kwargs(url) if options is not None else {}
            try:
                self._pool = redis.ConnectionPool.from_url(url, command_packer=_packer(), **common, **conn_kw)
            except ValueError as e:
                raise InvalidInputError(f"invalid Redis URL {self.safe_url!r}: {e}", param="cache") from e
            self._r = redis.Redis(connection_pool=self._pool)
        self._c = _Counters()
        # background writer state
        self._cv = threading.Condition()
        self._queue: collections.deque[tuple[str, MMEmbedding, int]] = collections.deque()
        self._queue_max = max(1, async_queue_size)
        self._pending_bytes = 0
        self._max_pending_bytes = async_max_pending_bytes
        self._inflight = 0
        self._worker: threading.Thread | None = None
        self._closing = False
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisEmbeddingCache({self.safe_url!r}, ttl_s={self.ttl_s})"

    # --- error mapping -----------------------------------------------------------------------------
    @contextmanager
    def _errors(self, op: str) -> Iterator[None]:
        try:
            yield
        except redis.exceptions.AuthenticationError as e:
            raise ServiceUnavailableError(
                f"Redis embedding cache at {self.safe_url}: authentication failed during {op} ({e}); "
                f"give the right password (--redis-password-file, MMPIPE_REDIS_PASSWORD, or "
                f"redis://:PASSWORD@host:port/db)") from e
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
            raise ServiceUnavailableError(
                f"Redis embedding cache at {self.safe_url} is unreachable during {op}: {str(e).rstrip('.')}. "
                f"Check that redis-server is running and reachable from here, or run with an in-process "
                f"cache (--cache memory) or none (--cache off)") from e
        except redis.exceptions.ResponseError as e:
            raise ServiceUnavailableError(
                f"Redis embedding cache at {self.safe_url} refused {op}: {e}") from e
        except redis.exceptions.RedisClusterException as e:  # no seed answered, slot not covered, ...
            raise ServiceUnavailableError(f"Redis Cluster at {self.safe_url} failed during {op}: {e}") from e
        except redis.exceptions.RedisError as e:  # protocol errors and the like
            raise ServiceUnavailableError(
                f"Redis embedding cache at {self.safe_url} failed during {op}: {e!r}") from e

    def ping(self) -> bool:
        """True when the server (every cluster primary) answers PING; raises ServiceUnavailableError if not."""
        with self._errors("PING"):
            if self._cluster is None:
                return bool(self._r.ping())
            return all(bool(self._cluster.get_redis_connection(n).ping()) for n in self._cluster.get_primaries())

    # --- routing -----------------------------------------------------------------------------------
    def _route(self, keys: Sequence[str]) -> list[tuple[Any, list[list[int]]]]:
        """Positions of `keys` grouped by the connection pool that serves them, each group split into
        MGET-sized chunks that lie in one slot (cluster) or are just chunks (one server)."""
        if self._cluster is None:
            idx = list(range(len(keys)))
            return [(self._pool, [idx[i:i + _MGET_CHUNK] for i in range(0, len(idx), _MGET_CHUNK)])]
        nodes: dict[str, tuple[Any, dict[int, list[int]]]] = {}
        with self._errors("slot routing"):
            for i, k in enumerate(keys):
                slot = self._cluster.keyslot(k)
                node = self._cluster.nodes_manager.get_node_from_slot(slot)
                if node.name not in nodes:
                    nodes[node.name] = (self._cluster.get_redis_connection(node).connection_pool, {})
                nodes[node.name][1].setdefault(slot, []).append(i)
        out = []
        for pool, slots in nodes.values():
            chunks = [g[j:j + _MGET_CHUNK] for g in slots.values() for j in range(0, len(g), _MGET_CHUNK)]
            out.append((pool, chunks))
        return out

    def _rerouted(self, fn, op: str):
        """fn() once more after refreshing the slot map, when a cluster said the map was stale (MOVED, ASK,
        CLUSTERDOWN) or a node connection dropped (a node restarted, failed over)."""
        try:
            return fn()
        except ServiceUnavailableError as e:
            if self._cluster is None or not _needs_reroute(e):
                raise
            log.info("Redis Cluster %s: %s; refreshing the slot map and retrying once", op, e.__cause__ or e)
            with self._errors("CLUSTER SLOTS"):
                self._cluster.nodes_manager.initialize()
            return fn()

    # --- reads -------------------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[MMEmbedding | None]:
        keys = list(keys)
        raw: list[Any] = self._rerouted(lambda: self._read(keys), "MGET") if keys else []
        out: list[MMEmbedding | None] = []
        hits = misses = nread = 0
        bad: list[str] = []
        for key, val in zip(keys, raw):
            if val is None:
                misses += 1
                out.append(None)
                continue
            nread += len(val)
            try:
                # A tensor buffer from the raw reader, or bytes from the redis-py fallback; both are
                # viewed, not copied.
                buf = memoryview(val.numpy()) if isinstance(val, torch.Tensor) else val
                out.append(unpack_embedding(buf, verify=self.verify))
                hits += 1
            except CacheVersionError as e:
                # Written by a replica with a newer format: a miss here, but valid for that replica.
                log.debug("cache entry %s: %s", key, e)
                misses += 1
                out.append(None)
            except CacheCorruptError as e:
                log.warning("dropping corrupt cache entry %s: %s", key, e)
                bad.append(key)
                misses += 1
                out.append(None)
        self._c.add(hits=hits, misses=misses, bytes_read=nread, corrupt=len(bad))
        if bad:
            try:
                self._r.unlink(*bad)
            except redis.exceptions.RedisError as e:  # the read succeeded; failing to clean up is not fatal
                log.warning("could not delete corrupt cache entries: %s", e)
                self._c.add(errors=1)
        return out

    def _read(self, keys: list[str]) -> list[Any]:
        """Values of `keys` in their order (None for misses): one pipeline of MGETs per server."""
        raw: list[Any] = [None] * len(keys)
        for pool, chunks in self._route(keys):
            for chunk, values in zip(chunks, self._mget(pool, [[keys[i] for i in c] for c in chunks])):
                if len(values) != len(chunk):
                    raise ServiceUnavailableError(f"Redis embedding cache at {self.safe_url}: MGET of {len(chunk)} "
                                                  f"keys answered {len(values)} values")
                for i, v in zip(chunk, values):
                    raw[i] = v
        return raw

    def _mget(self, pool: Any, chunks: list[list[str]]) -> list[list[Any]]:
        """One MGET per chunk, pipelined on one connection of `pool`, received by `_BulkReader`."""
        if not chunks:
            return []
        for attempt in (0, 1):
            try:
                with self._errors("MGET"):
                    conn = pool.get_connection()
                    try:
                        sock = getattr(conn, "_sock", None) if self.raw_reads else None
                        packed = [p for c in chunks for p in conn.pack_command("MGET", *c)]
                        conn.send_packed_command(packed)
                        try:
                            if sock is None:  # asked for, or a connection type we don't know: redis-py reads
                                return [list(conn.read_response()) for _ in chunks]
                            reader = _BulkReader(sock)
                            return [reader.bulk_array() for _ in chunks]
                        except BaseException:
                            # We read past redis-py's parser (or stopped after an error reply with more
                            # replies pending); the stream position is unknown: never reuse the connection.
                            conn.disconnect()
                            raise
                    finally:
                        pool.release(conn)
            except ServiceUnavailableError as e:
                # MGET is read-only: one retry on a fresh connection covers a stale pooled one.
                if attempt == 0 and isinstance(e.__cause__, (redis.exceptions.ConnectionError, OSError)) \
                        and not isinstance(e.__cause__, redis.exceptions.AuthenticationError):
                    continue
                raise
        raise AssertionError("unreachable")

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        keys = list(keys)
        if not keys:
            return []
        with self._errors("EXISTS"):
            pipe = self._r.pipeline(transaction=False)
            for k in keys:
                pipe.exists(k)
            return [bool(n) for n in pipe.execute()]

    def ttl(self, key: str) -> float | None:
        """Seconds until `key` expires; None if it has no expiry or does not exist."""
        with self._errors("PTTL"):
            ms = self._r.pttl(key)
        return ms / 1000.0 if ms is not None and ms >= 0 else None

    # --- writes ------------------------------------------------------------------------------------
    def _set_chunks(self, key: str, emb: MMEmbedding) -> tuple[list[Any], int]:
        """RESP for `SET key <payload> [EX ttl]` as buffers; the tensor stays a memoryview."""
        parts = pack_embedding_parts(emb)
        n = payload_nbytes(parts)
        k = key.encode("utf-8")
        nargs = 5 if self.ttl_s else 3
        head = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (nargs, len(k), k, n)
        tail = b"\r\n"
        if self.ttl_s:
            t = str(self.ttl_s).encode()
            tail += b"$2\r\nEX\r\n$%d\r\n%s\r\n" % (len(t), t)
        return [head, *parts, tail], n

    def _write(self, items: Sequence[tuple[str, MMEmbedding]]) -> None:
        """Pipelined SETs, one pipeline per server; raises ServiceUnavailableError on failure."""
        if not items:
            return

        done: set[str] = set()  # a retry after MOVED re-sends only what no server has acknowledged

        def write() -> None:
            todo = [(k, e) for k, e in items if k not in done]
            for pool, groups in self._route([k for k, _ in todo]):
                part = [todo[i] for g in groups for i in g]
                self._write_on(pool, part)
                done.update(k for k, _ in part)

        self._rerouted(write, "SET")

    def _write_on(self, pool: Any, items: Sequence[tuple[str, MMEmbedding]]) -> None:
        """Pipelined SETs on one connection of `pool`."""
        chunks: list[Any] = []
        total = 0
        for key, emb in items:
            c, n = self._set_chunks(key, emb)
            chunks.extend(c)
            total += n
        chunks = _coalesce(chunks)
        for attempt in (0, 1):
            conn = None
            try:
                with self._errors("SET"):
                    conn = pool.get_connection()
                    try:
                        conn.send_packed_command(chunks)
                        errors: list[Exception] = []
                        # Read every reply even after an error reply, so the connection goes back to
                        # the pool in sync with the server.
                        for _ in items:
                            try:
                                conn.read_response()
                            except redis.exceptions.ResponseError as e:
                                errors.append(e)
                    finally:
                        pool.release(conn)
                    if errors:
                        raise errors[0]
                break
            except ServiceUnavailableError as e:
                # A stale pooled connection fails once; SET is idempotent, so one retry on a fresh
                # connection is safe. Server-side refusals (OOM, ...) are not retried.
                if attempt == 0 and isinstance(e.__cause__, (redis.exceptions.ConnectionError, OSError)) \
                        and not isinstance(e.__cause__, redis.exceptions.AuthenticationError):
                    continue
                raise
        self._c.add(puts=len(items), bytes_written=total)

    def put_many(self, items: Iterable[tuple[str, MMEmbedding]]) -> None:
        items = list(items)
        # Bounded batches keep one pipeline from holding hundreds of MB of references at once.
        batch: list[tuple[str, MMEmbedding]] = []
        size = 0
        for key, emb in items:
            batch.append((key, emb))
            size += embedding_nbytes(emb)
            if size >= _BATCH_MAX_BYTES:
                self._write(batch)
                batch, size = [], 0
        self._write(batch)

    def put_async(self, key: str, emb: MMEmbedding) -> None:
        """Queue a write for the background thread and return at once.

        If the queue is full (by count or bytes), the write is dropped and counted in stats().dropped:
        a cache may lose writes, but must not stall the request that produced them.
        """
        n = embedding_nbytes(emb)
        with self._cv:
            if self._closing:
                self._c.add(dropped=1)
                return
            if len(self._queue) >= self._queue_max or (
                    self._queue and self._pending_bytes + n > self._max_pending_bytes):
                self._c.add(dropped=1)
                log.debug("cache write queue full, dropping %s", key)
                return
            self._queue.append((key, emb, n))
            self._pending_bytes += n
            if self._worker is None:
                self._worker = threading.Thread(target=self._run_writer, name="mmpipe-cache-writer",
                                                daemon=True)
                self._worker.start()
            self._cv.notify_all()

    def _run_writer(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue and self._closing:
                    return
                batch: list[tuple[str, MMEmbedding, int]] = []
                size = 0
                while self._queue and (not batch or size + self._queue[0][2] <= _BATCH_MAX_BYTES):
                    item = self._queue.popleft()
                    batch.append(item)
                    size += item[2]
                self._inflight = len(batch)
            try:
                self._write([(k, e) for k, e, _ in batch])
            except Exception as e:  # noqa: BLE001 - a background cache write must never kill the thread
                self._c.add(errors=len(batch))
                log.warning("background cache write of %d item(s) failed: %s", len(batch), e)
            finally:
                with self._cv:
                    self._inflight = 0
                    self._pending_bytes -= size
                    self._cv.notify_all()

    def flush(self, timeout_s: float | None = None) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._inflight, timeout=timeout_s)

    def delete(self, key: str) -> None:
        with self._errors("UNLINK"):
            self._r.unlink(key)

    def clear(self) -> None:
        """Delete every key under "<namespace>:" (SCAN + UNLINK; other data in the db is left alone)."""
        with self._errors("SCAN/UNLINK"):
            batch: list[bytes] = []
            for k in self._r.scan_iter(match=f"{self.namespace}:*", count=1000):
                batch.append(k)
                if len(batch) >= 1000:
                    self._r.unlink(*batch)
                    batch = []
            if batch:
                self._r.unlink(*batch)

    # --- failures ----------------------------------------------------------------------------------
    def key_groups(self, keys: Sequence[str]) -> list[list[int]]:
        """Positions of `keys` per cluster node, from the client's slot map (one group for one server)."""
        if self._cluster is None or not keys:
            return super().key_groups(keys)
        groups: dict[str, list[int]] = {}
        try:
            for i, k in enumerate(keys):
                node = self._cluster.nodes_manager.get_node_from_slot(self._cluster.keyslot(k))
                groups.setdefault(node.name, []).append(i)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException):  # a slot without a node
            return super().key_groups(keys)
        return list(groups.values())

    def is_outage(self, error: Exception) -> bool:
        return not isinstance(error.__cause__, redis.exceptions.AuthenticationError)

    def record_errors(self, n: int) -> None:
        self._c.add(errors=n)

    # --- bookkeeping -------------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        """Local counters plus server-wide numbers when the server answers (else those stay None)."""
        extra: dict[str, Any] = {}
        try:
            # a cluster: the sum over its primaries (each holds its own slots, under its own maxmemory)
            servers = [self._r] if self._cluster is None else [
                self._cluster.get_redis_connection(n) for n in self._cluster.get_primaries()]
            infos = [(int(r.dbsize()), r.info()) for r in servers]
            extra["entries"] = sum(n for n, _ in infos)
            extra["evictions"] = sum(int(i.get("evicted_keys", 0)) for _, i in infos)
            extra["bytes_used"] = sum(int(i.get("used_memory", 0)) for _, i in infos)
            extra["max_bytes"] = sum(int(i.get("maxmemory", 0)) for _, i in infos) or None
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError):
            pass
        with self._cv:
            pending = len(self._queue) + self._inflight
        return self._c.snapshot(pending=pending, **extra)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what `put_async` queued (waiting at most `timeout_s`), stop the writer, disconnect."""
        if self._closed:
            return
        self.flush(timeout_s)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join(timeout_s)
        self._closed = True
        if self._cluster is not None:
            self._cluster.close()
        else:
            self._pool.disconnect()
