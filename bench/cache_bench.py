"""Benchmark the Redis embedding-cache write and read paths for one LLaVA-7B-sized image embedding.

    .venv/bin/python bench/cache_bench.py                  # starts a private redis-server on 127.0.0.1
    .venv/bin/python bench/cache_bench.py --url redis://127.0.0.1:6379/0 --items 16 --rounds 3

Default value: a (576, 4096) bf16 tensor, 4.7 MB. The loop rotates over `--items` distinct tensors and
keys (16 x 4.7 MB = 75 MB, more than this CPU's 32 MB L3): repeating one value would measure
cache-resident copies and look 2-3x faster than serving traffic does. Each variant runs
`items x rounds` timed items (bounded), after one untimed warm-up call. Only loopback servers are
accepted so a stray URL can't flood a shared Redis.

Variants (W = write, R = read); within each group they take turns item by item:
  W redis-py default SET     redis.Redis().set(key, payload); hiredis installed -> hiredis.pack_command
  W redis-py pipeline x4     the same client, 4 SETs in one pipeline (per-item time reported)
  W redis-py py-packer SET   redis-py with its pure-Python RESP packer (large values are not copied)
  W raw socket sendmsg       RESP header + payload + CRLF in one sendmsg on a plain socket
  W cache.put                RedisEmbeddingCache.put end to end: pack (blake3) + zero-copy pooled write
  W pack_embedding[_parts]   serialisation only: one joined bytes object vs the zero-copy parts list
  W cache.put_async          caller-visible latency of put_async (the write happens on a thread)
  R redis-py GET (bytes)     redis.Redis().get(key) -> bytes (hiredis parser); no unpack, no checksum
  R raw socket GET           GET read straight into a torch.empty buffer
  R cache.get                RedisEmbeddingCache.get end to end: MGET + checksum + zero-copy unpack
  R same, redis-py reader    the same with raw_reads=False (hiredis parser, 1 MiB socket reads)
  R cache.get_many x4        4 keys in one MGET (per-item time reported)
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import redis
import torch
from redis.connection import Encoder, PythonRespSerializer

from mmpipe.shared.cache.embedded_redis import EmbeddedRedis
from mmpipe.shared.cache.redis_store import RedisEmbeddingCache
from mmpipe.shared.cache.serde import pack_embedding, pack_embedding_parts
from mmpipe.shared.types import MMEmbedding


def interleaved(variants: dict[str, tuple[Callable[[int], Any], int]], items: int,
                rounds: int) -> dict[str, list[float]]:
    """Seconds per item for every variant, taking turns item by item.

    variants: name -> (fn(i), items per call). Turn-taking matters on a small shared machine: a burst
    of background load then slows every variant alike instead of whichever happened to be running.
    Results are kept alive for a round, as a request would keep its embeddings, so allocations really
    come from fresh memory. One untimed warm-up call per variant.
    """
    for fn, _ in variants.values():
        fn(0)
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        keep: list[Any] = []
        for i in range(items):
            for name, (fn, per_call) in variants.items():
                if i % per_call or i + per_call > items:
                    continue
                t0 = time.perf_counter()
                keep.append(fn(i))
                out[name].append((time.perf_counter() - t0) / per_call)
    return out


def report(name: str, secs: list[float], nbytes: int) -> None:
    med = statistics.median(secs)
    p90 = sorted(secs)[int(0.9 * (len(secs) - 1))]
    print(f"{name:<28} median {med * 1e3:7.3f} ms   p90 {p90 * 1e3:7.3f} ms   "
          f"{nbytes / med / 1e6:8.0f} MB/s   (n={len(secs)})", flush=True)


class RawConn:
    """A bare RESP connection: just enough protocol for SET and GET of one key."""

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.sock.makefile("rb", buffering=1 << 16)

    def _sendmsg_all(self, parts: list[Any]) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            n = self.sock.sendmsg(views)
            while n and views:
                if n >= views[0].nbytes:
                    n -= views[0].nbytes
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0

    def set(self, key: bytes, value: Any) -> None:
        n = memoryview(value).nbytes
        self._sendmsg_all([b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, n), value, b"\r\n"])
        line = self.f.readline()
        if line != b"+OK\r\n":
            raise RuntimeError(f"SET failed: {line!r}")

    def get(self, key: bytes) -> torch.Tensor | None:
        self.sock.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key))
        line = self.f.readline()
        n = int(line[1:])
        if n < 0:
            return None
        buf = torch.empty(n, dtype=torch.uint8)
        mv = memoryview(buf.numpy())
        got = 0
        while got < n:
            got += self.f.readinto(mv[got:])
        self.f.read(2)
        return buf

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def run(url: str, tokens: int, hidden: int, items: int, rounds: int) -> None:
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 6379
    embs = [MMEmbedding("image", torch.randn(tokens, hidden).to(torch.bfloat16), {"num_tokens": tokens})
            for _ in range(items)]
    payloads = [pack_embedding(e) for e in embs]
    nbytes = len(payloads[0])
    keys = [f"mmpipe:bench:{i}".encode() for i in range(items)]
    print(f"value: ({tokens}, {hidden}) bf16 = {nbytes / 1e6:.2f} MB payload; {items} distinct values; "
          f"server {host}:{port}; torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}", flush=True)

    default = redis.Redis.from_url(url)
    print(f"redis-py {redis.__version__}, hiredis parser/packer: {redis.utils.HIREDIS_AVAILABLE}", flush=True)
    info = default.info("server")
    print(f"redis-server {info.get('redis_version')}", flush=True)
    pypack = redis.Redis(connection_pool=redis.ConnectionPool.from_url(
        url, command_packer=PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)))
    raw = RawConn(host, port)
    cache = RedisEmbeddingCache(url)

    slow_reader = RedisEmbeddingCache(url, raw_reads=False)

    def pipe4(i: int) -> None:
        p = default.pipeline(transaction=False)
        for j in range(i, i + 4):
            p.set(keys[j], payloads[j])
        p.execute()

    print("-- writes (payload already packed unless noted)", flush=True)
    res = interleaved({
        "W redis-py default SET": (lambda i: default.set(keys[i], payloads[i]), 1),
        "W redis-py pipeline x4": (pipe4, 4),
        "W redis-py py-packer SET": (lambda i: pypack.set(keys[i], payloads[i]), 1),
        "W raw socket sendmsg": (lambda i: raw.set(keys[i], payloads[i]), 1),
        "W cache.put (pack+write)": (lambda i: cache.put(keys[i].decode(), embs[i]), 1),
        "W pack_embedding alone": (lambda i: pack_embedding(embs[i]), 1),
        "W pack_embedding_parts": (lambda i: pack_embedding_parts(embs[i]), 1),
    }, items, rounds)
    for name, secs in res.items():
        report(name, secs, nbytes)

    lat: list[float] = []
    for _ in range(rounds):
        for i in range(items):
            t0 = time.perf_counter()
            cache.put_async(keys[i].decode(), embs[i])
            lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    cache.flush()
    report("W cache.put_async (caller)", lat, nbytes)
    s = cache.stats()
    print(f"   put_async drained {time.perf_counter() - t0:.3f}s after the last call; "
          f"dropped {s.dropped}, errors {s.errors}", flush=True)

    print("-- reads", flush=True)
    res = interleaved({
        "R redis-py GET (bytes)": (lambda i: default.get(keys[i]), 1),
        "R raw socket GET->tensor": (lambda i: raw.get(keys[i]), 1),
        "R cache.get (get+verify)": (lambda i: cache.get(keys[i].decode()), 1),
        "R same, redis-py reader": (lambda i: slow_reader.get(keys[i].decode()), 1),
        "R cache.get_many x4": (lambda i: cache.get_many([k.decode() for k in keys[i:i + 4]]), 4),
    }, items, rounds)
    for name, secs in res.items():
        report(name, secs, nbytes)
    slow_reader.close()
    got = cache.get(keys[0].decode())
    assert got is not None and torch.equal(got.tensor, embs[0].tensor), "benchmark read back wrong data"

    default.delete(*keys)
    for c in (default, pypack):
        c.close()
    raw.close()
    cache.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="existing loopback Redis (default: start a private redis-server)")
    ap.add_argument("--tokens", type=int, default=576)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--items", type=int, default=16, help="distinct values to rotate over (1-256)")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the items per variant (1-20)")
    a = ap.parse_args(argv)
    if not 1 <= a.items <= 256 or not 1 <= a.rounds <= 20:
        ap.error("--items must be 1-256 and --rounds 1-20 (the loop is meant to stay short)")
    if a.url:
        host = urlsplit(a.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            ap.error(f"refusing non-loopback host {host!r}: this benchmark writes hundreds of MB")
        run(a.url, a.tokens, a.hidden, a.items, a.rounds)
    else:
        with EmbeddedRedis(maxmemory="2gb") as srv:
            run(srv.url, a.tokens, a.hidden, a.items, a.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
