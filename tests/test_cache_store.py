"""Embedding cache: payload format, key layout, in-process LRU, and Redis (a real redis-server).

Two RedisEmbeddingCache objects on one server stand in for two replicas sharing the cache.
"""
from __future__ import annotations

import json
import struct
import threading
import time

import blake3
import pytest
import redis
import torch

from mmpipe.shared.cache.base import CacheStats, EmbeddingCache
from mmpipe.shared.cache.embedded_redis import EmbeddedRedis, find_redis_server, free_port
from mmpipe.shared.cache.factory import make_cache
from mmpipe.shared.cache.keys import CacheKeyspace, escape_component, model_fingerprint, settings_digest
from mmpipe.shared.cache.lru import LRUEmbeddingCache
from mmpipe.shared.cache.redis_store import RedisEmbeddingCache, redact_url
from mmpipe.shared.cache.serde import (
    CacheCorruptError,
    CacheVersionError,
    pack_embedding,
    pack_embedding_parts,
    pack_tensors,
    payload_nbytes,
    unpack_embedding,
    unpack_tensors,
)
from mmpipe.shared.errors import InvalidInputError, MMPipeError, ServiceUnavailableError, UnsupportedError
from mmpipe.shared.types import MMEmbedding

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def emb(n: int = 4, hidden: int = 8, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
        modality: str = "image") -> MMEmbedding:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, hidden, generator=g).to(dtype)
    return MMEmbedding(modality, t, {"num_tokens": n, "grid_thw": [1, 2, n // 2], "seed": seed})


def same(a: MMEmbedding | None, b: MMEmbedding) -> bool:
    return (a is not None and a.modality == b.modality and a.tensor.dtype == b.tensor.dtype
            and a.tensor.shape == b.tensor.shape and torch.equal(a.tensor, b.tensor) and a.meta == b.meta)


# --- serde ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_embedding_roundtrip(dtype: torch.dtype) -> None:
    e = MMEmbedding("video", torch.randn(6, 10).to(dtype),
                    {"num_tokens": 6, "grid_thw": (2, 3, 4), "second_per_grid_t": 0.5, "tag": "x"})
    b = pack_embedding(e)
    assert b == b"".join(bytes(p) for p in pack_embedding_parts(e))
    assert payload_nbytes(pack_embedding_parts(e)) == len(b)
    out = unpack_embedding(b)
    assert out.modality == "video" and out.tensor.dtype == dtype and out.tensor.shape == (6, 10)
    assert torch.equal(out.tensor, e.tensor)
    # JSON turns the tuple into a list; everything else comes back as it went in.
    assert out.meta == {"num_tokens": 6, "grid_thw": [2, 3, 4], "second_per_grid_t": 0.5, "tag": "x"}


def test_unpack_is_zero_copy_and_handles_noncontiguous_input() -> None:
    base = torch.randn(8, 6)
    e = MMEmbedding("image", base.t(), {})  # non-contiguous view
    buf = bytearray(pack_embedding(e))
    out = unpack_embedding(buf)
    assert torch.equal(out.tensor, base.t())
    addr = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    assert addr <= out.tensor.data_ptr() < addr + len(buf), "tensor should view the payload, not a copy"


def test_tensors_roundtrip_many_dtypes() -> None:
    ts = {
        "pixel_values": torch.randn(3, 4, 5),
        "image_grid_thw": torch.tensor([[1, 4, 6]], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 7, dtype=torch.float16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "bf": torch.randn(2, 3).to(torch.bfloat16),
    }
    got, meta = unpack_tensors(pack_tensors(ts, {"num_tokens": 6, "k": [1, 2]}))
    assert list(got) == list(ts)
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    assert meta == {"num_tokens": 6, "k": [1, 2]}
    assert unpack_tensors(pack_tensors({})) == ({}, {})


def test_unsupported_dtype_and_meta_are_refused() -> None:
    with pytest.raises(UnsupportedError):
        pack_embedding(MMEmbedding("image", torch.zeros(2, 2, dtype=torch.int64)))
    with pytest.raises(UnsupportedError):
        pack_embedding(MMEmbedding("image", torch.zeros(2, 2), {"bad": object()}))


def test_every_flipped_byte_is_detected() -> None:
    """No single changed byte anywhere in the payload may yield a tensor."""
    b = pack_embedding(emb(3, 5))
    for i in range(len(b)):
        for bit in (0x01, 0x80):
            bad = bytearray(b)
            bad[i] ^= bit
            with pytest.raises(CacheCorruptError):
                unpack_embedding(bytes(bad))


def test_flipped_tensor_byte_in_big_payload() -> None:
    e = emb(576, 1024, torch.bfloat16)
    b = bytearray(pack_embedding(e))
    b[len(b) // 2] ^= 0x10
    with pytest.raises(CacheCorruptError, match="checksum"):
        unpack_embedding(b)


def test_truncated_or_extended_payload_is_detected() -> None:
    b = pack_embedding(emb(4, 8))
    for n in [0, 3, 8, 39, 40, 60, len(b) // 2, len(b) - 1]:
        with pytest.raises(CacheCorruptError):
            unpack_embedding(b[:n])
    with pytest.raises(CacheCorruptError):
        unpack_embedding(b + b"\x00")
    with pytest.raises(CacheCorruptError):
        unpack_embedding(b + b)


def test_corrupt_error_is_a_domain_error_with_a_clear_message() -> None:
    with pytest.raises(MMPipeError, match="corrupt mmpipe payload: bad magic"):
        unpack_embedding(b"garbage" * 10)


def _reheader(b: bytes, edit) -> bytes:
    """Rewrite the JSON header of payload `b` (re-signing it) so only the semantic checks can object."""
    magic, hlen, _ = struct.unpack_from("<4sI32s", b, 0)
    header = json.loads(b[40:40 + hlen])
    edit(header)
    data = b[-(-(40 + hlen) // 64) * 64:]  # everything after the old header's alignment padding
    hb = json.dumps(header, separators=(",", ":")).encode()
    head = struct.pack("<4sI32s", magic, len(hb), blake3.blake3(hb).digest()) + hb
    return head + bytes(-len(head) % 64) + data


def test_semantic_header_checks() -> None:
    b = pack_embedding(emb(4, 8))
    with pytest.raises(CacheVersionError, match="version 9"):
        unpack_embedding(_reheader(b, lambda h: h.update(v=9)))
    with pytest.raises(CacheCorruptError, match="nbytes"):
        unpack_embedding(_reheader(b, lambda h: h["tensors"][0].update(shape=[2, 8])))
    with pytest.raises(CacheCorruptError, match="holds 'tensors'"):
        unpack_embedding(pack_tensors({"tensor": torch.zeros(2)}))
    with pytest.raises(CacheCorruptError):
        unpack_tensors(b)
    # Crafted headers (the header digest is a checksum anyone can recompute) still fail cleanly.
    with pytest.raises(CacheCorruptError):
        unpack_embedding(_reheader(b, lambda h: h["tensors"][0].update(shape=[1 << 60, 0])))
    with pytest.raises(CacheCorruptError):
        unpack_embedding(_reheader(b, lambda h: h["tensors"][0].update(shape=[0] * 40)))
    with pytest.raises(CacheCorruptError):
        unpack_embedding(_reheader(b, lambda h: h["tensors"][0].update(offset=-64)))
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(CacheCorruptError):
        unpack_tensors(struct.pack("<4sI32s", b"MMPT", len(deep), blake3.blake3(deep).digest()) + deep)
    # Re-signed header, tensor bytes unchanged, but a different recorded digest: the data check catches it.
    with pytest.raises(CacheCorruptError, match="checksum"):
        unpack_embedding(_reheader(b, lambda h: h["tensors"][0].update(blake3="0" * 64)))


# --- keys ----------------------------------------------------------------------------------------------

FP = "a" * 64
SD = "b" * 64
H = blake3.blake3(b"img").hexdigest()


def test_key_layout() -> None:
    ks = CacheKeyspace(FP, SD)
    assert ks.key("image", uuid="u1") == f"mmpipe:v1:{FP}:{SD}:image:uuid:-:u1"
    assert ks.key("image", uuid="u1", tenant="acme") == f"mmpipe:v1:{FP}:{SD}:image:uuid:acme:u1"
    assert ks.key("audio", content_hash=H) == f"mmpipe:v1:{FP}:{SD}:audio:hash:{H}"
    assert ks.key("audio", content_hash=H.upper()) == ks.key("audio", content_hash=H)
    assert CacheKeyspace(FP, SD, namespace="t1").key("image", uuid="u").startswith("t1:v1:")


def test_uuid_escaping_prevents_forged_keys() -> None:
    ks = CacheKeyspace(FP, SD)
    forged = ks.key("image", uuid=f"x:hash:{H}")
    assert forged != ks.key("image", content_hash=H)
    # Every uuid/tenant key has exactly the structural colons, whatever the uuid contains.
    n_colons = ks.key("image", uuid="plain").count(":")
    for u in ["a:b", ":", "::::", "%3A", "a%3Ab", "ü:ñ", "x\n:y", "-"]:
        for t in [None, "t", "t:u", "-", ""]:
            assert ks.key("image", uuid=u, tenant=t).count(":") == n_colons
    # Tenant separation, including a colon that tries to move the tenant/uuid boundary.
    assert ks.key("image", uuid="u", tenant="a") != ks.key("image", uuid="u", tenant="b")
    assert ks.key("image", uuid="u", tenant="a") != ks.key("image", uuid="u")
    assert ks.key("image", uuid="z", tenant="x:y") != ks.key("image", uuid="y:z", tenant="x")
    assert ks.key("image", uuid="u", tenant="-") != ks.key("image", uuid="u", tenant=None)
    # Escaping is injective: ':' and a literal '%3A' differ.
    assert ks.key("image", uuid="a:b") != ks.key("image", uuid="a%3Ab")
    assert escape_component("a:b%") == "a%3Ab%25"
    # A uuid key never equals a hash key, and modalities are separate.
    assert ks.key("image", uuid=H) != ks.key("image", content_hash=H)
    assert ks.key("image", content_hash=H) != ks.key("video", content_hash=H)


def test_key_validation() -> None:
    ks = CacheKeyspace(FP, SD)
    with pytest.raises(InvalidInputError):
        ks.key("image", content_hash=H[:16])  # truncated hash
    with pytest.raises(InvalidInputError):
        ks.key("image", content_hash="z" * 64)
    with pytest.raises(InvalidInputError):
        ks.key("image")
    with pytest.raises(InvalidInputError):
        ks.key("image", uuid="u", content_hash=H)
    with pytest.raises(InvalidInputError):
        ks.key("image", uuid="")
    with pytest.raises(InvalidInputError):
        ks.key("ima:ge", uuid="u")
    with pytest.raises(InvalidInputError):
        CacheKeyspace("not:hex", SD)
    with pytest.raises(InvalidInputError):
        CacheKeyspace(FP, SD, namespace="a:b")


def test_fingerprints_are_full_canonical_digests() -> None:
    cfg = {"hidden_size": 64, "vision_config": {"patch_size": 14, "image_size": 336}, "dtype": torch.bfloat16}
    cfg_reordered = {"vision_config": {"image_size": 336, "patch_size": 14}, "dtype": torch.bfloat16,
                     "hidden_size": 64}
    fp = model_fingerprint("org/model", cfg)
    assert len(fp) == 64 and all(c in "0123456789abcdef" for c in fp)
    assert fp == model_fingerprint("org/model", cfg_reordered)
    assert fp != model_fingerprint("org/other", cfg)
    assert fp != model_fingerprint("org/model", {**cfg, "hidden_size": 65})
    sd = settings_digest({"max_pixels": 1003520, "fps": 2.0})
    assert len(sd) == 64 and sd == settings_digest({"fps": 2.0, "max_pixels": 1003520})
    assert sd != settings_digest({"max_pixels": 1003520, "fps": 1.0})
    with pytest.raises(InvalidInputError):
        settings_digest({"x": object()})  # its str() is an address: would differ per process


# --- LRU -----------------------------------------------------------------------------------------------


def test_lru_evicts_by_bytes_and_counts() -> None:
    one = emb(4, 8, torch.float32).tensor.numel() * 4  # 128 bytes
    c = LRUEmbeddingCache(max_bytes=3 * one)
    es = {f"k{i}": emb(4, 8, torch.float32, seed=i) for i in range(4)}
    for k in ["k0", "k1", "k2"]:
        c.put(k, es[k])
    assert same(c.get("k0"), es["k0"])  # k0 is now most recently used
    c.put("k3", es["k3"])  # evicts k1, the least recently used
    assert c.exists_many(["k0", "k1", "k2", "k3"]) == [True, False, True, True]
    got = c.get_many(["k1", "k2", "k3"])
    assert got[0] is None and same(got[1], es["k2"]) and same(got[2], es["k3"])
    s = c.stats()
    assert isinstance(s, CacheStats)
    assert (s.hits, s.misses, s.puts, s.entries, s.evictions) == (3, 1, 4, 3, 1)
    assert s.bytes_used == 3 * one and s.bytes_written == 4 * one and s.bytes_read == 3 * one
    # Replacing a key re-counts its bytes; an entry above max_bytes is not stored at all.
    c.put("k0", es["k0"])
    assert c.stats().bytes_used == 3 * one
    c.put("big", emb(100, 8, torch.float32))
    assert not c.exists("big") and c.stats().bytes_used <= 3 * one
    c.delete("k0")
    assert not c.exists("k0") and c.stats().bytes_used == 2 * one
    c.clear()
    assert c.stats().entries == 0 and c.stats().bytes_used == 0


def test_lru_clones_views_so_the_bound_is_true() -> None:
    batch = torch.randn(1000, 64)  # one encoder batch output
    item = MMEmbedding("image", batch[:4], {})
    c = LRUEmbeddingCache(max_bytes=100_000)
    c.put("k", item)
    got = c.get("k")
    assert torch.equal(got.tensor, batch[:4])
    assert got.tensor.untyped_storage().nbytes() == 4 * 64 * 4, "must not pin the whole batch buffer"
    # A view with little waste around it is kept as is, and charged for all of its storage.
    row = torch.randn(65, 64)[1:]  # 256 spare bytes
    c.put("r", MMEmbedding("image", row, {}))
    assert c.get("r").tensor.data_ptr() == row.data_ptr()
    assert c.stats().bytes_used == 4 * 64 * 4 + 65 * 64 * 4


def test_lru_returns_independent_meta_and_is_thread_safe() -> None:
    c = LRUEmbeddingCache(max_bytes=1 << 20)
    c.put("k", emb())
    c.get("k").meta["extra"] = 1
    assert "extra" not in c.get("k").meta
    c.delete("k")

    def worker(i: int) -> None:
        for j in range(200):
            c.put(f"{i}-{j % 20}", emb(2, 4, seed=j))
            c.get(f"{(i + 1) % 4}-{j % 20}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = c.stats()
    assert s.bytes_used == sum(e.tensor.numel() * e.tensor.element_size()
                               for e in c.get_many([f"{i}-{j}" for i in range(4) for j in range(20)]) if e)


# --- Redis ---------------------------------------------------------------------------------------------


def test_find_redis_server() -> None:
    import os

    exe = find_redis_server()
    assert os.access(exe, os.X_OK)


def test_redis_roundtrip_across_two_replicas(redis_url: str) -> None:
    a, b = RedisEmbeddingCache(redis_url), RedisEmbeddingCache(redis_url)
    try:
        assert a.ping() and b.ping()
        es = {f"mmpipe:k{i}": emb(8, 16, DTYPES[i % 3], seed=i) for i in range(6)}
        a.put("mmpipe:k0", es["mmpipe:k0"])
        a.put_many([(k, v) for k, v in es.items() if k != "mmpipe:k0"])
        assert same(b.get("mmpipe:k0"), es["mmpipe:k0"])
        keys = ["mmpipe:k3", "mmpipe:missing", "mmpipe:k1", "mmpipe:k5"]
        got = b.get_many(keys)
        assert got[1] is None
        for k, g in zip(keys, got):
            if k != "mmpipe:missing":
                assert same(g, es[k]), k
        assert b.exists_many(keys) == [True, False, True, True]
        assert b.get_many([]) == [] and b.exists_many([]) == []
        b.delete("mmpipe:k3")
        assert a.get("mmpipe:k3") is None
        sa, sb = a.stats(), b.stats()
        assert sa.puts == 6 and sa.bytes_written > 0 and sb.hits == 4 and sb.misses == 1
        assert sb.entries == 5 and sb.bytes_read > 0
    finally:
        a.close()
        b.close()


def test_redis_big_embedding_and_large_mget(redis_url: str) -> None:
    """One LLaVA-7B image (576 x 4096 bf16, 4.7 MB), and an MGET spanning several chunks."""
    with RedisEmbeddingCache(redis_url) as c:
        big = emb(576, 4096, torch.bfloat16)
        c.put("mmpipe:big", big)
        assert same(c.get("mmpipe:big"), big)
        small = {f"mmpipe:s{i}": emb(2, 4, seed=i) for i in range(40)}
        c.put_many(small.items())
        got = c.get_many(list(small))
        assert all(same(g, small[k]) for k, g in zip(small, got))


def test_redis_ttl(redis_url: str) -> None:
    with RedisEmbeddingCache(redis_url, ttl_s=100) as c, RedisEmbeddingCache(redis_url, ttl_s=1) as short:
        c.put("mmpipe:t", emb())
        assert 99 < (c.ttl("mmpipe:t") or 0) <= 100
        short.put_many([("mmpipe:s1", emb()), ("mmpipe:s2", emb())])
        assert short.exists_many(["mmpipe:s1", "mmpipe:s2"]) == [True, True]
        time.sleep(1.1)
        assert short.get_many(["mmpipe:s1", "mmpipe:s2"]) == [None, None]
    with RedisEmbeddingCache(redis_url) as no_ttl:
        no_ttl.put("mmpipe:n", emb())
        assert no_ttl.ttl("mmpipe:n") is None


def test_redis_put_async_and_flush(redis_url: str) -> None:
    writer, reader = RedisEmbeddingCache(redis_url), RedisEmbeddingCache(redis_url)
    try:
        es = {f"mmpipe:a{i}": emb(64, 256, seed=i) for i in range(30)}
        for k, v in es.items():
            writer.put_async(k, v)
        assert writer.flush(timeout_s=10)
        assert writer.stats().pending == 0
        got = reader.get_many(list(es))
        assert all(same(g, es[k]) for k, g in zip(es, got))
        s = writer.stats()
        assert s.puts == 30 and s.dropped == 0 and s.errors == 0
    finally:
        writer.close()
        reader.close()


def test_redis_put_async_queue_is_bounded(redis_url: str) -> None:
    c = RedisEmbeddingCache(redis_url, async_queue_size=2, async_max_pending_bytes=1 << 30)
    try:
        gate = threading.Event()
        real_write = c._write

        def slow_write(items):  # the first batch blocks until released
            gate.wait(10)
            real_write(items)

        c._write = slow_write  # type: ignore[method-assign]
        for i in range(10):
            c.put_async(f"mmpipe:q{i}", emb(seed=i))
        gate.set()
        assert c.flush(timeout_s=10)
        s = c.stats()
        assert s.dropped > 0 and s.puts + s.dropped == 10
    finally:
        c.close()


def test_redis_close_flushes_pending_writes(redis_url: str) -> None:
    c = RedisEmbeddingCache(redis_url)
    for i in range(5):
        c.put_async(f"mmpipe:c{i}", emb(seed=i))
    c.close()
    c.close()  # idempotent
    with RedisEmbeddingCache(redis_url) as r:
        assert all(r.exists_many([f"mmpipe:c{i}" for i in range(5)]))


def test_redis_corrupt_entry_is_a_miss_and_is_dropped(redis_url: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    with RedisEmbeddingCache(redis_url) as c:
        e = emb(16, 32)
        c.put("mmpipe:good", e)
        c.put("mmpipe:flip", e)
        # Flip one byte in the middle of the stored tensor data, server side.
        n = raw.strlen("mmpipe:flip")
        mid = raw.getrange("mmpipe:flip", n // 2, n // 2)
        raw.setrange("mmpipe:flip", n // 2, bytes([mid[0] ^ 0xFF]))
        raw.set("mmpipe:junk", b"not an embedding")
        raw.set("mmpipe:trunc", pack_embedding(e)[:-7])
        raw.set("mmpipe:future", _reheader(pack_embedding(e), lambda h: h.update(v=2)))
        got = c.get_many(["mmpipe:good", "mmpipe:flip", "mmpipe:junk", "mmpipe:trunc", "mmpipe:future"])
        assert same(got[0], e) and got[1:] == [None, None, None, None]
        assert c.stats().corrupt == 3
        assert raw.exists("mmpipe:flip", "mmpipe:junk", "mmpipe:trunc") == 0, "corrupt entries are deleted"
        assert raw.exists("mmpipe:future") == 1, "a newer format is a miss here, not garbage to delete"
    raw.close()


def test_redis_clear_only_touches_its_namespace(redis_url: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    raw.set("other:key", b"keep me")
    with RedisEmbeddingCache(redis_url) as c:
        c.put_many((f"mmpipe:x{i}", emb(seed=i)) for i in range(5))
        c.clear()
        assert not any(c.exists_many([f"mmpipe:x{i}" for i in range(5)]))
    assert raw.get("other:key") == b"keep me"
    raw.close()


def test_redis_unreachable_fails_fast_with_a_clear_error() -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there
    c = RedisEmbeddingCache(url, socket_timeout_s=2.0)
    t0 = time.monotonic()
    for op in (c.ping, lambda: c.get("k"), lambda: c.put("k", emb()), lambda: c.exists_many(["k"])):
        with pytest.raises(ServiceUnavailableError) as ei:
            op()
        msg = str(ei.value)
        assert "127.0.0.1" in msg and "redis-server" in msg
        assert "s3cret" not in msg, "the password must not leak into error messages"
    assert time.monotonic() - t0 < 2.0
    # Background writes to a dead server are counted, never raised.
    c.put_async("k", emb())
    assert c.flush(timeout_s=5)
    assert c.stats().errors == 1
    c.close()


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("raw_reads", [True, False], ids=["raw-reader", "redis-py-reader"])
def test_redis_reads_with_resp2_and_resp3(redis_url: str, protocol: int, raw_reads: bool) -> None:
    """Both read paths understand both protocol versions, misses, and empty / odd-sized values."""
    raw = redis.Redis.from_url(redis_url)
    with RedisEmbeddingCache(f"{redis_url}?protocol={protocol}", raw_reads=raw_reads) as c:
        es = {"mmpipe:small": emb(1, 2), "mmpipe:big": emb(300, 1000, torch.float32),
              "mmpipe:fp16": emb(7, 3, torch.float16)}
        c.put_many(es.items())
        raw.set("mmpipe:empty", b"")
        for _ in range(3):  # the pooled connection must stay in sync across calls
            got = c.get_many(["mmpipe:small", "mmpipe:nope", "mmpipe:big", "mmpipe:empty", "mmpipe:fp16"])
            assert same(got[0], es["mmpipe:small"]) and got[1] is None and got[3] is None
            assert same(got[2], es["mmpipe:big"]) and same(got[4], es["mmpipe:fp16"])
            assert c.exists_many(["mmpipe:big", "mmpipe:nope"]) == [True, False]
        if raw_reads:
            got[2].tensor.add_(1)  # the raw reader's buffers are private and writable
    raw.close()


def test_redis_password_in_url() -> None:
    with EmbeddedRedis(maxmemory=None, extra_args=("--requirepass", "pw0rd")) as srv:
        good = srv.url.replace("redis://", "redis://:pw0rd@")
        with RedisEmbeddingCache(good) as c:
            c.put("mmpipe:p", emb())
            assert same(c.get("mmpipe:p"), emb())
        with RedisEmbeddingCache(srv.url.replace("redis://", "redis://:wrong@")) as bad:
            with pytest.raises(ServiceUnavailableError, match="authentication failed") as ei:
                bad.get("mmpipe:p")
            assert "wrong" not in str(ei.value)
        with RedisEmbeddingCache(srv.url) as anon, pytest.raises(ServiceUnavailableError):
            anon.get("mmpipe:p")
        # a wrong password is a configuration to fix, not an outage to ride out: best_effort does not hide it
        from mmpipe.shared.cache.best_effort import read_or_miss, write_or_skip

        with RedisEmbeddingCache(srv.url.replace("redis://", "redis://:wrong@")) as bad:
            with pytest.raises(ServiceUnavailableError, match="authentication failed"):
                read_or_miss(bad, ["mmpipe:p"])
            with pytest.raises(ServiceUnavailableError, match="authentication failed"):
                write_or_skip(bad, [("mmpipe:p", emb())])
    # the server away: a miss, and a skipped write
    with RedisEmbeddingCache(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5) as away:
        assert read_or_miss(away, ["mmpipe:p", "mmpipe:q"]) == ([None, None], [0, 1])
        assert not write_or_skip(away, [("mmpipe:p", emb())]) and away.stats().errors == 2


def test_redis_concurrent_clients_share_the_pool(redis_url: str) -> None:
    """Threads reading and writing through one cache object keep every pooled connection in sync."""
    with RedisEmbeddingCache(redis_url) as c:
        es = [emb(32, 64, seed=i) for i in range(8)]
        failures: list[str] = []

        def worker(w: int) -> None:
            for j in range(25):
                k = f"mmpipe:c{(w + j) % 8}"
                c.put(k, es[(w + j) % 8])
                for key, g in zip([k, "mmpipe:none"], c.get_many([k, "mmpipe:none"])):
                    if key == "mmpipe:none" and g is not None or key != "mmpipe:none" and not same(
                            g, es[int(key[8:])]):
                        failures.append(key)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures
        assert c.stats().corrupt == 0


def test_redis_recovers_after_server_restart() -> None:
    """A pooled connection to a restarted server is stale; the next call reconnects instead of failing."""
    srv = EmbeddedRedis(port=free_port(), maxmemory=None)
    with srv, RedisEmbeddingCache(srv.url) as c:
        c.put("mmpipe:r", emb())
        assert same(c.get("mmpipe:r"), emb())
        srv.stop()
        srv.start()  # the pooled connection now points at a dead socket
        assert c.get("mmpipe:r") is None  # the data went with the old process; not an error
        c.put("mmpipe:r", emb())
        srv.stop()
        with pytest.raises(ServiceUnavailableError):
            c.get("mmpipe:r")
        srv.start()
        c.put("mmpipe:r", emb())
        assert same(c.get("mmpipe:r"), emb())


def test_bulk_reader_skips_resp3_push_frames_and_splits_reads() -> None:
    """Unsolicited RESP3 frames before the MGET reply are skipped; bytes arriving one at a time work."""
    import socket

    from mmpipe.shared.cache.redis_store import _BulkReader

    a, b = socket.socketpair()
    wire = (b">3\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\nfoo\r\n%1\r\n+k\r\n:1\r\n"
            b"|1\r\n+x\r\n+y\r\n*4\r\n$3\r\nabc\r\n_\r\n$-1\r\n$0\r\n\r\n")

    def trickle() -> None:
        for i in range(len(wire)):
            b.sendall(wire[i:i + 1])

    t = threading.Thread(target=trickle)
    t.start()
    got = _BulkReader(a).bulk_array()
    t.join()
    assert [None if g is None else bytes(g.numpy()) for g in got] == [b"abc", None, None, b""]
    b.sendall(b"-ERR boom\r\n")
    with pytest.raises(redis.exceptions.ResponseError, match="boom"):
        _BulkReader(a).bulk_array()
    a.close()
    b.close()


def test_redact_url() -> None:
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://user:pw@h/2") == "redis://user:***@h/2"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_redis_maxmemory_eviction_reads_as_miss() -> None:
    """A small allkeys-lru server evicts; evicted entries are None, survivors are exact."""
    with EmbeddedRedis(maxmemory="8mb", policy="allkeys-lru") as srv, RedisEmbeddingCache(srv.url) as c:
        es = {f"mmpipe:e{i}": emb(256, 1024, torch.bfloat16, seed=i) for i in range(24)}  # 512 KiB each
        for k, v in es.items():
            c.put(k, v)
        got = c.get_many(list(es))
        missing = [k for k, g in zip(es, got) if g is None]
        assert missing, "12 MB of values in an 8 MB server must evict something"
        assert len(missing) < len(es)
        for k, g in zip(es, got):
            if g is not None:
                assert same(g, es[k])
        s = c.stats()
        assert s.evictions and s.evictions > 0 and s.corrupt == 0


def test_embedded_redis_lifecycle() -> None:
    srv = EmbeddedRedis(maxmemory=None)
    with srv:
        assert srv.is_running()
        with RedisEmbeddingCache(srv.url) as c:
            assert c.ping()
        pid = srv.pid
    assert not srv.is_running() and srv.pid is None and pid
    with pytest.raises(ServiceUnavailableError):
        EmbeddedRedis(binary="/nonexistent/redis-server", startup_timeout_s=1).start()


# --- factory -------------------------------------------------------------------------------------------


def test_make_cache(redis_url: str) -> None:
    assert isinstance(make_cache(None), LRUEmbeddingCache)
    m = make_cache("memory", max_bytes=1234)
    assert isinstance(m, LRUEmbeddingCache) and m.max_bytes == 1234
    assert make_cache("off") is None and make_cache("none") is None
    r = make_cache(redis_url, ttl_s=5)
    assert isinstance(r, RedisEmbeddingCache) and isinstance(r, EmbeddingCache) and r.ttl_s == 5
    r.close()
    with pytest.raises(InvalidInputError):
        make_cache("memcached://x")
