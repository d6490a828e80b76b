"""Prefix-aware routing over generator replicas (services/gateway/routing.py).

In process: the router's block keys are the engine's own (shared/engine/block_hash.py through the engine's
Sequence and BlockManager), its choices (same prefix -> same replica, media identity in the key, saturation ->
least loaded, short prompts, session, round robin) and the flags. With processes: the session's stage stack plus
a second real generator behind one `mmpipe gateway --generator-addr a,b`, driven by the official `openai`
client: requests sharing a prefix all land on one replica (its prefix-cache hit counter on /metrics moves, the
other's does not), different prefixes spread over both, and a saturated replica makes the gateway fall back.
"""
from __future__ import annotations

import argparse
import signal
import time
from dataclasses import dataclass

import pytest

from mmpipe.services.gateway.config import RoutingConfig, add_cli_args, config_from_args
from mmpipe.services.gateway.routing import Router
from mmpipe.shared.engine.block_hash import prefix_keys, root_key
from mmpipe.shared.errors import InvalidInputError

from services_helpers import scrape, start_gateway_process, start_stage_process, wait_healthy

BS = 4
IMG = 7  # placeholder id of the routers below


@dataclass(frozen=True)
class Ref:
    """What the router reads of a resolved media item (the gateway's MediaRef fields)."""

    modality: str
    num_tokens: int
    key: str


def router(n: int = 2, **cfg) -> Router:
    return Router([f"10.0.0.{i}:7000" for i in range(n)], RoutingConfig(block_size=BS, **cfg), {"image": IMG})


# ---- in process -------------------------------------------------------------------------------------------
def test_router_keys_are_the_engines_block_keys():
    """The one block-hash owner: chaining `prefix_keys` over an expanded prompt gives exactly the keys the
    engine's BlockManager computes for the same 1-D-RoPE sequence (tokens and a media item's key)."""
    import torch

    from mmpipe.shared.engine.block_manager import BlockManager
    from mmpipe.shared.engine.sequence import Sequence
    from mmpipe.shared.types import EngineRequest, MMSpan, SamplingParams

    ids = list(range(10, 16)) + [IMG] * 9 + list(range(20, 31))
    span = MMSpan(offset=6, length=9, key="mmpipe:v1:fp:sd:image:hash:abc")
    req = EngineRequest(request_id="r", prompt_token_ids=ids, sampling=SamplingParams(max_tokens=1),
                        mm_embeds=torch.zeros(9, 4), mm_positions=torch.arange(6, 15), mm_spans=[span])
    bm = BlockManager(16, BS, enable_prefix_caching=True, namespace="ns")
    seq = Sequence(req, max_model_len=64, eos_token_ids=[], generator=None)
    assert bm.allocate_prompt(seq)
    bm.commit(seq, len(ids))
    engine_keys = seq.block_hashes
    ours = prefix_keys(root_key("ns", BS, False), ids, [(6, 9, span.key)], BS)
    assert ours == engine_keys and len(ours) == 6
    # an item without a key ends the keyed prefix at its first row, as in the engine
    assert prefix_keys(root_key("ns", BS, False), ids, [(6, 9, None)], BS) == engine_keys[:1]


def test_routing_imports_no_torch():
    """The gateway computes the engine's block keys without torch (shared/engine's package init is lazy)."""
    import subprocess
    import sys

    code = ("import sys, mmpipe.services.gateway.routing, mmpipe.services.gateway.stages; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_same_prefix_same_replica_and_media_identity():
    r = router(4, prefix_blocks=3)
    head = list(range(100, 112))  # three full blocks
    homes = {r.pick(head + [200 + i, 300 + i, 301]).replica for i in range(6)}
    assert len(homes) == 1
    # the expanded media rows are keyed by the item's key: one prefix with different images differs in key
    with_img = [1, 2, IMG, 3, 4, 5]
    k1 = r.routing_key(with_img, [Ref("image", 8, "image:hash:aaa")])
    assert k1 == r.routing_key(with_img + [9, 9, 9], [Ref("image", 8, "image:hash:aaa")])
    assert k1 != r.routing_key(with_img, [Ref("image", 8, "image:hash:bbb")])
    assert k1 != r.routing_key(with_img, [Ref("image", 9, "image:hash:aaa")])
    # many different prefixes use every replica (rendezvous over 4 addresses)
    assert {r.pick([1000 + i, 1001, 1002, 1003, 0]).replica for i in range(0, 400, 5)} == {0, 1, 2, 3}


def test_saturated_replica_falls_back_to_least_loaded():
    r = router(3, saturation_threshold=2)
    prompt = list(range(40, 60))
    home = r.pick(prompt)
    assert home.decision == "hit"
    with r.hold(home.replica), r.hold(home.replica):
        fb = r.pick(prompt)
        assert fb.decision == "fallback" and fb.replica != home.replica
        with r.hold(fb.replica):  # the next fallback avoids the replica that now has one in flight too
            fb2 = r.pick(prompt)
            assert fb2.decision == "fallback" and fb2.replica not in (home.replica, fb.replica)
    assert r.in_flight == [0, 0, 0] and r.pick(prompt) == home  # released: back home
    short = r.pick([1, 2, 3])  # less than one block: no key
    assert short.decision == "no_prefix" and short.replica == r.least_loaded()


def test_replica_marked_down_is_routed_around():
    r = router(3)
    prompts = [[500 + i] * 12 for i in range(30)]
    homes = [r.pick(p).replica for p in prompts]
    r.mark_down(homes[0])
    moved = [r.pick(p).replica for p in prompts]
    assert homes[0] not in moved
    assert all(m == h for m, h in zip(moved, homes) if h != homes[0])  # only its prefixes move
    r._down_until = [0.0] * 3
    assert [r.pick(p).replica for p in prompts] == homes


def test_session_and_roundrobin():
    s = router(3, logic="session", session_key="x-user-id")
    assert len({s.pick([i] * 20, session="alice").replica for i in range(5)}) == 1
    assert len({s.pick([1] * 20, session=f"user-{i}").replica for i in range(30)}) == 3
    assert s.pick([1] * 20).decision == "no_prefix"
    rr = router(3, logic="roundrobin")
    assert [rr.pick([1] * 20).replica for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_routing_flags():
    p = add_cli_args(argparse.ArgumentParser())
    cfg = config_from_args(p.parse_args(["--model", "m", "--generator-addr", "a:1, b:2", "--routing-logic",
                                         "session", "--session-key", "x-user", "--routing-saturation-threshold",
                                         "8", "--block-size", "32"]))
    assert cfg.generator_addr == "a:1, b:2"
    assert cfg.routing == RoutingConfig(logic="session", block_size=32, prefix_blocks=4, saturation_threshold=8,
                                        session_key="x-user")
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--routing-logic", "kvaware"])
    for bad, param in ((dict(logic="session"), "--session-key"), (dict(block_size=0), "--block-size"),
                       (dict(saturation_threshold=-1), "--routing-saturation-threshold")):
        with pytest.raises(InvalidInputError) as e:
            RoutingConfig(**bad)
        assert e.value.param == param
    with pytest.raises(InvalidInputError) as e:
        config_from_args(p.parse_args(["--model", "m", "--generator-addr", " , "]))
    assert e.value.param == "--generator-addr"


# ---- two real generator processes behind one gateway ------------------------------------------------------
@pytest.fixture(scope="module")
def two_replicas(stage_stack, qwen2_vl_dir, tmp_path_factory):  # noqa: F811
    """The stack's generator plus a second one (in-process engine: cheaper to start), and a gateway in front of
    both with a saturation threshold of 1 (the test kills the second generator at its end)."""
    log_dir = tmp_path_factory.mktemp("route")
    gen2 = start_stage_process("generator", qwen2_vl_dir, stage_stack.redis_url, extra=["--no-engine-process"],
                               log_dir=log_dir, wait=False)
    gens = {stage_stack.generator_addr: stage_stack.metrics_url("generator"),
            gen2.addr: f"http://127.0.0.1:{gen2.metrics_port}/metrics"}
    addrs = {"ingest": stage_stack.ingest_addr, "encoder": stage_stack.encoder_addr, "generator": ",".join(gens)}
    gw = start_gateway_process(qwen2_vl_dir, addrs, log_dir, ["--routing-logic", "prefixaware", "--block-size",
                                                                "16", "--routing-saturation-threshold", "1",
                                                                "--shutdown-grace-s", "2"])
    try:
        wait_healthy(gen2.addr, 120, gen2.proc, gen2.log_path)
        gw.wait_healthy()
        yield gw, gens, gen2
    finally:
        for proc in (gw.proc, gen2.proc):  # both shut down at once, then wait for each
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        gw.stop()
        gen2.stop()


def _counts(gw, gens) -> dict[str, tuple[float, float]]:
    """replica -> (Generate calls the gateway routed there, prompt tokens its prefix cache served)."""
    return {a: (scrape(f"{gw.url}/metrics", "mmpipe_gateway_routed_requests_total", replica=a),
                scrape(url, "mmpipe_generator_prefix_cache_hits_tokens_total")) for a, url in gens.items()}


def _delta(before, after):
    return {a: (after[a][0] - before[a][0], after[a][1] - before[a][1]) for a in after}


def test_two_generators_prefix_routing(two_replicas):
    import openai

    gw, gens, gen2 = two_replicas
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="-", max_retries=0, timeout=60)

    def complete(ids: list[int], n: int = 2) -> None:
        client.completions.create(model="tiny", prompt=ids, max_tokens=n, temperature=0.0)

    # 1. one 80-token prefix (5 blocks of 16) with four different suffixes: one replica takes all four, and
    #    only its prefix cache serves the shared blocks
    shared = [(7 * i) % 400 + 20 for i in range(80)]
    before = _counts(gw, gens)
    for i in range(4):
        complete(shared + [30 + i, 31 + i, 32 + i])
    d = _delta(before, _counts(gw, gens))
    (home, (n_home, hits_home)), (other, (n_other, hits_other)) = sorted(d.items(), key=lambda kv: -kv[1][0])
    assert (n_home, n_other) == (4, 0), d
    assert hits_home >= 3 * 80 and hits_other == 0, d  # the last 3 reused at least the 5 shared blocks

    # 2. eight different prefixes spread over both replicas
    before = _counts(gw, gens)
    for p in range(8):
        complete([(11 * i + 37 * p) % 400 + 20 for i in range(70)])
    d = _delta(before, _counts(gw, gens))
    assert sum(n for n, _ in d.values()) == 8 and all(n >= 1 for n, _ in d.values()), d

    # 3. saturation (threshold 1): while a long stream holds the prefix's replica, the same prefix falls back
    #    to the other replica
    fb0 = scrape(f"{gw.url}/metrics", "mmpipe_gateway_routing_decisions_total", decision="fallback")
    before = _counts(gw, gens)
    stream = client.completions.create(model="tiny", prompt=shared + [40], max_tokens=1500, temperature=0.0,
                                       stream=True, extra_body={"ignore_eos": True})
    try:
        next(iter(stream))  # the first token: the call is in flight on the prefix's home replica
        t0 = time.monotonic()
        complete(shared + [41])
        assert time.monotonic() - t0 < 30
    finally:
        stream.close()
    d = _delta(before, _counts(gw, gens))
    assert d[home][0] == 1 and d[other][0] == 1, d
    assert scrape(f"{gw.url}/metrics", "mmpipe_gateway_routing_decisions_total", decision="fallback") == fb0 + 1

    # 4. a replica that goes away: the prefixes of step 2 (some hashed to it) are all still answered, by the other
    def routed(addr: str) -> float:
        return scrape(f"{gw.url}/metrics", "mmpipe_gateway_routed_requests_total", replica=addr)

    survivor = next(a for a in gens if a != gen2.addr)
    tried, served = routed(gen2.addr), routed(survivor)
    gen2.kill()
    for p in range(8):
        complete([(11 * i + 37 * p) % 400 + 20 for i in range(70)])
    assert routed(gen2.addr) > tried  # some of these prefixes hash to it: it was tried, failed, routed around
    assert routed(survivor) == served + 8
