"""The embedding cache on a real 3-node Redis Cluster (fixture `redis_cluster`, tests/redis_cluster_helpers.py):
keys spread over every node, reads split per slot and answered in the caller's order, a stale slot map followed,
and a node restart that never serves a wrong embedding. A node that is down costs its own keys only: read as misses
and re-encoded offline (shared/cache/best_effort.py), a uuid-only item on it a retryable error. URL parsing of
redis+cluster:// seeds.
"""
from __future__ import annotations

import random

import pytest
import torch

from mmpipe.shared.cache.best_effort import read_or_miss, write_or_skip
from mmpipe.shared.cache.factory import make_cache
from mmpipe.shared.cache.keys import CacheKeyspace
from mmpipe.shared.cache.redis_options import RedisOptions
from mmpipe.shared.cache.redis_store import RedisEmbeddingCache, redact_url
from mmpipe.shared.cache.meta_peek import peek_headers
from mmpipe.shared.cache.redis_urls import parse_cluster_url, sync_client
from mmpipe.shared.errors import InvalidInputError, NotCachedError, ServiceUnavailableError
from mmpipe.shared.types import MMEmbedding

N = 48


def emb(seed: int) -> MMEmbedding:
    g = torch.Generator().manual_seed(seed)
    n = 2 + seed % 5
    return MMEmbedding("image", torch.randn(n, 16, generator=g).to(torch.bfloat16), {"num_tokens": n, "seed": seed})


def same(a: MMEmbedding | None, b: MMEmbedding) -> bool:
    return a is not None and a.meta == b.meta and a.tensor.dtype == b.tensor.dtype and torch.equal(a.tensor, b.tensor)


def keys(n: int = N) -> list[str]:
    ks = CacheKeyspace("ab" * 32, "cd" * 32)
    return [ks.uuid_key("image", f"img-{i}", tenant="t{x}") for i in range(n)]


def check_served(cache: RedisEmbeddingCache, ks: list[str], written: dict[str, MMEmbedding]) -> list[str]:
    """Read `ks` in a shuffled order; every value served must be exactly the one written under its key.
    Returns the keys that missed."""
    order = random.Random(len(ks)).sample(ks, len(ks))
    got = cache.get_many(order)
    assert len(got) == len(order)
    missed = []
    for k, v in zip(order, got):
        if v is None:
            missed.append(k)
        else:
            assert k in written and same(v, written[k]), f"{k}: served a value that was not written under it"
    return missed


@pytest.mark.parametrize("raw_reads", [True, False], ids=["raw-reader", "redis-py-reader"])
def test_cluster_cache_spreads_entries_and_answers_in_order(redis_cluster, redis_cluster_url: str,
                                                           raw_reads: bool) -> None:
    writer = make_cache(redis_cluster_url)
    reader = RedisEmbeddingCache(redis_cluster_url, raw_reads=raw_reads)  # another replica
    try:
        assert isinstance(writer, RedisEmbeddingCache) and writer.ping()
        ks = keys()
        written = {k: emb(i) for i, k in enumerate(ks)}
        writer.put_many(written.items())
        assert not any("{" in k for k in ks), "keys must carry no hash tag (the tenant's '{' is escaped)"
        per_node = [redis_cluster.client(i).dbsize() for i in range(redis_cluster.n)]
        assert sum(per_node) == N and min(per_node) > 0, per_node  # every node holds a share
        absent = [k + "-absent" for k in ks[:8]]
        for _ in range(2):
            assert sorted(check_served(reader, ks + absent, written)) == sorted(absent)
        assert reader.exists_many([ks[0], absent[0], ks[-1]]) == [True, False, True]
        # the encoder's Lookup reads only payload headers, through the client redis_urls builds (RedisCluster)
        client = sync_client(redis_cluster_url)
        try:
            heads = peek_headers(client, [ks[0], absent[0], ks[5]])
        finally:
            client.close()
        assert heads[1] is None and heads[0]["meta"]["seed"] == 0 and heads[2]["meta"]["seed"] == 5
        st = reader.stats()
        assert st.entries == N and st.hits == 2 * N and st.misses == 2 * len(absent)
        writer.put_async(absent[0], emb(1000))
        assert writer.flush(10)
        assert same(reader.get(absent[0]), emb(1000))
        reader.delete(absent[0])
        assert reader.get(absent[0]) is None
        reader.clear()  # SCAN on every primary, UNLINK split per slot
        assert sum(redis_cluster.client(i).dbsize() for i in range(redis_cluster.n)) == 0
    finally:
        writer.close()
        reader.close()


def test_cluster_reads_are_one_mget_per_slot(redis_cluster, redis_cluster_url: str) -> None:
    """A cross-slot MGET is an error in a cluster: each MGET stays in one slot, all of a node's go in one trip."""
    cache = RedisEmbeddingCache(redis_cluster_url)
    try:
        ks = keys(24)
        cache.put_many((k, emb(i)) for i, k in enumerate(ks))
        for i in range(redis_cluster.n):
            redis_cluster.client(i).config_resetstat()
        assert all(v is not None for v in cache.get_many(ks))
        slots = {redis_cluster.client(0).cluster("KEYSLOT", k) for k in ks}
        calls = 0
        for i in range(redis_cluster.n):
            stats = redis_cluster.client(i).info("commandstats")
            calls += stats.get("cmdstat_mget", {}).get("calls", 0)
            assert stats.get("cmdstat_mget", {}).get("failed_calls", 0) == 0
        assert calls == len(slots)
    finally:
        cache.close()


def test_cluster_cache_follows_a_moved_slot(redis_cluster, redis_cluster_url: str) -> None:
    """The slot map the client holds goes stale (a slot is handed to another node): MOVED -> refresh -> retry."""
    cache = RedisEmbeddingCache(redis_cluster_url)
    (key,) = keys(1)
    src = redis_cluster.owner(key)
    dst = (src + 1) % redis_cluster.n
    slot = redis_cluster.client(0).cluster("KEYSLOT", key)
    dst_id = redis_cluster.client(dst).cluster("MYID")
    dst_id = dst_id.decode() if isinstance(dst_id, bytes) else dst_id
    try:
        assert cache.get(key) is None  # the client has learnt the map
        for i in (dst, src, *[j for j in range(redis_cluster.n) if j not in (src, dst)]):
            redis_cluster.client(i).execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        cache.put(key, emb(7))  # sent to the old owner first: MOVED
        assert redis_cluster.client(dst).exists(key) == 1
        assert same(cache.get(key), emb(7))
    finally:
        cache.close()
        # hand the (one-key) slot back so the session cluster keeps its layout
        redis_cluster.client(dst).delete(key)
        src_id = redis_cluster.client(src).cluster("MYID")
        src_id = src_id.decode() if isinstance(src_id, bytes) else src_id
        for i in (src, dst, *[j for j in range(redis_cluster.n) if j not in (src, dst)]):
            redis_cluster.client(i).execute_command("CLUSTER SETSLOT", slot, "NODE", src_id)


def test_cluster_node_restart_serves_no_wrong_embedding(redis_cluster, redis_cluster_url: str) -> None:
    cache = RedisEmbeddingCache(redis_cluster_url, socket_timeout_s=1.0)
    ks = keys()
    written = {k: emb(i) for i, k in enumerate(ks)}
    victim = 1
    on_victim = [k for k in ks if redis_cluster.owner(k) == victim]
    elsewhere = [k for k in ks if redis_cluster.owner(k) != victim]
    assert on_victim and elsewhere
    try:
        cache.put_many(written.items())
        assert check_served(cache, ks, written) == []
        redis_cluster.stop_node(victim)
        # the other nodes keep serving their share, exactly
        assert check_served(cache, elsewhere, written) == []
        # a read touching the dead node fails as a dead server does: retryable, never a wrong or partial answer
        with pytest.raises(ServiceUnavailableError):
            cache.get_many(ks)
        cache.put_async(on_victim[0], emb(999))  # a write that cannot land is dropped and counted, not raised
        assert cache.flush(10)
        assert cache.stats().errors >= 1
        redis_cluster.start_node(victim)  # back on its port with its slots, empty
        missed = check_served(cache, ks, written)
        assert sorted(missed) == sorted(on_victim)
        cache.put_many((k, written[k]) for k in on_victim)  # recomputed and written again
        assert check_served(cache, ks, written) == []
    finally:
        cache.close()
        redis_cluster.wait_ok()


def test_cluster_node_killed_reads_its_keys_as_misses_and_skips_its_writes(redis_cluster, redis_cluster_url: str
                                                                           ) -> None:
    """best_effort: with one master SIGKILLed, a read of keys on every node serves the live nodes' values exactly
    and reports the dead node's keys unreachable (misses); a write to it is skipped and counted, not raised."""
    cache = RedisEmbeddingCache(redis_cluster_url, socket_timeout_s=1.0)
    ks = keys()
    written = {k: emb(i) for i, k in enumerate(ks)}
    victim = 2
    try:
        cache.put_many(written.items())
        groups = cache.key_groups(ks)
        assert len(groups) == redis_cluster.n and sorted(i for g in groups for i in g) == list(range(len(ks)))
        redis_cluster.kill_node(victim)
        got, unreachable = read_or_miss(cache, ks)
        assert unreachable == [i for i, k in enumerate(ks) if redis_cluster.owner(k) == victim] != []
        for i, (k, v) in enumerate(zip(ks, got)):
            assert (v is None) if i in unreachable else same(v, written[k]), k
        errors = cache.stats().errors
        assert not write_or_skip(cache, [(ks[unreachable[0]], emb(999))])
        assert write_or_skip(cache, [(k, written[k]) for i, k in enumerate(ks) if i not in unreachable])
        assert cache.stats().errors > errors
    finally:
        redis_cluster.start_node(victim)
        cache.close()
    assert read_or_miss(cache_again := RedisEmbeddingCache(redis_cluster_url), ks)[1] == []  # the client recovers
    cache_again.close()


def _node_of_new_key(cluster, before: set[bytes]) -> tuple[int, bytes]:
    new = [(i, k) for i in range(cluster.n) for k in cluster.client(i).scan_iter(match="mmpipe:*") if k not in before]
    assert len(new) == 1, new
    return new[0]


def test_offline_llm_reencodes_while_a_cluster_node_is_down(redis_cluster, redis_cluster_url: str) -> None:
    """The offline LLM on a cluster cache with one master SIGKILLed: every image with its media is answered (its
    entry read from a live node, or re-encoded when its node is down: the write skipped), with the same greedy
    tokens; only a uuid-only item on the dead node fails, retryably; after the restart it is simply not cached."""
    import numpy as np
    from PIL import Image

    from mmpipe import LLM, SamplingParams
    from mmpipe.shared.models.tiny import ensure_tiny_model

    llm = LLM(str(ensure_tiny_model("qwen2_vl")), device="cpu", mm_cache=redis_cluster_url)
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    def ask(part: dict) -> list[int]:
        msgs = [{"role": "user", "content": [part, {"type": "text", "text": "Describe it."}]}]
        return list(llm.chat(msgs, sp, use_tqdm=False)[0].outputs[0].token_ids)

    def image(i: int) -> dict:
        arr = np.random.default_rng(7000 + i).integers(0, 255, (56, 56, 3), dtype=np.uint8)
        return {"type": "image_pil", "image_pil": Image.fromarray(arr)}

    seen: set[bytes] = set()
    want, node = {}, {}
    for i in range(-1, 8):  # -1: the uuid item
        part = {**image(i), "uuid": "cl-uuid"} if i < 0 else image(i)
        want[i] = ask(part)
        node[i], k = _node_of_new_key(redis_cluster, seen)
        seen.add(k)
    victim = node[-1]
    on_victim = [i for i in range(8) if node[i] == victim]
    assert on_victim and len(on_victim) < 8, node
    redis_cluster.kill_node(victim)
    try:
        encoded = llm.resolver.stats.items_encoded
        assert {i: ask(image(i)) for i in range(8)} == {i: want[i] for i in range(8)}
        assert llm.resolver.stats.items_encoded - encoded == len(on_victim)  # the others were read from the cache
        assert ask({**image(-1), "uuid": "cl-uuid"}) == want[-1]  # with its media: re-encoded
        with pytest.raises(ServiceUnavailableError, match="cl-uuid.*unreachable"):
            ask({"type": "image_pil", "image_pil": None, "uuid": "cl-uuid"})
    finally:
        redis_cluster.start_node(victim)
    with pytest.raises(NotCachedError, match="cl-uuid"):  # back, empty: a miss, no longer an outage
        ask({"type": "image_pil", "image_pil": None, "uuid": "cl-uuid"})
    assert ask(image(on_victim[0])) == want[on_victim[0]]


def test_cluster_url_parsing_and_redaction() -> None:
    u = parse_cluster_url("redis+cluster://:s3cret@10.0.0.1:6379,redis-1.redis:6380/")
    assert u.seeds == (("10.0.0.1", 6379), ("redis-1.redis", 6380)) and u.password == "s3cret" and not u.tls
    assert parse_cluster_url("rediss+cluster://h:7000").tls
    for bad in ("redis+cluster://h:7000/2", "redis+cluster://h", "redis+cluster://h:0", "redis+cluster://:70000",
                "redis+cluster://h:7000,"):
        with pytest.raises(InvalidInputError) as e:
            parse_cluster_url(bad)
        assert e.value.param == "redis-url"
    assert redact_url("redis+cluster://:s3cret@h:1,h:2") == "redis+cluster://:***@h:1,h:2"
    # TLS files need a TLS scheme, the cluster one included
    kw = RedisOptions(tls_ca_file=__file__).client_kwargs("rediss+cluster://h:1")
    assert kw["ssl_ca_certs"] == __file__


def test_cluster_unreachable_fails_fast_with_a_clear_error() -> None:
    from mmpipe.shared.cache.embedded_redis import free_port

    url = f"redis+cluster://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailableError, match="Redis Cluster"):
        RedisEmbeddingCache(url, socket_timeout_s=0.5)


def test_gateway_readiness_client_pings_the_cluster(redis_cluster_url: str) -> None:
    """The gateway's /health pings the cache through redis_urls.async_client: a RedisCluster for a cluster URL."""
    import asyncio

    from mmpipe.shared.cache.redis_urls import async_client

    async def ping() -> bool:
        client = async_client(redis_cluster_url, None, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    assert asyncio.run(ping())
