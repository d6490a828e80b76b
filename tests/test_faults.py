"""Faults and load against the real stack (Redis + ingest + encoder + generator + gateway, tiny qwen2_vl, CPU).

Slow tests (`make test-slow`), one stack for the module, started by bench/load_test.py's `Stack` (as the e2e
tests start theirs) with a Redis of its own that can be restarted and shrunk:

  * Redis restarted mid-load, and Redis full (tiny maxmemory, allkeys-lru: entries evicted between ingest and
    generate): every answer is a 200 with the offline LLM's token ids, or a 503 with Retry-After; none lost.
  * encoder, generator and ingest killed (SIGKILL) under load, then restarted: lost = 0, every failure
    retryable (429/503 + Retry-After), text-only requests keep working while ingest or the encoder is down.
  * 2x capacity for a while (bench/load_test.py's ramp, then overload): bounded memory, rejections carry
    Retry-After, none lost. Reports go to build/faults/ (JSON + markdown).

The fast tests at the end check each overload bound in-process, with no stage running.
Only 127.0.0.1 is ever a target; every load loop is bounded in count and time.
"""
from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import load_test as lt  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "build" / "faults"
LOAD_S = float(os.environ.get("MMPIPE_FAULTS_LOAD_S", 45))
GATEWAY_ARGS = ("--max-concurrent-requests", "8", "--request-timeout", "15")
REPORTS: dict[str, dict] = {}


# --- the stack ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack():
    from mmpipe.shared.models.tiny import ensure_tiny_model

    # ingest decodes in worker processes (--decode-workers), so that one can be killed under load; the generator
    # keeps its prefix cache on (its default), so that concurrent requests for one image share cached blocks
    s = lt.Stack(str(ensure_tiny_model("qwen2_vl")), redis_maxmemory="256mb", gateway_args=GATEWAY_ARGS,
                 stage_args={"ingest": ["--decode-workers", "2"]})
    yield s
    s.stop()
    if REPORTS:
        OUT.mkdir(parents=True, exist_ok=True)
        md = "".join(lt.to_markdown(r, name) + "\n" for name, r in REPORTS.items())
        (OUT / "faults.md").write_text(md)


@pytest.fixture(scope="module")
def llm(stack):
    from mmpipe import LLM

    return LLM(stack.model_dir, device="cpu")


def _redis(stack):
    import redis

    return redis.Redis.from_url(stack.redis.url, socket_timeout=5)


def _wait(pred, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if pred():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def _healthy(stack) -> bool:
    return httpx.get(f"{stack.url}/health", timeout=2).status_code == 200


def _load_in_background(stack, cfg: lt.LoadConfig, **kw) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def go():
        box["report"] = lt.run_load(stack.target(), cfg, **kw)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, box


def _no_failures(report: dict) -> None:
    ld = report["load"]
    assert ld["lost"] == 0, ld
    assert ld["failed"] == 0, ld["failures"]  # every non-200 was a 429/503 with Retry-After


def _post(stack, body: dict, timeout: float = 20) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=stack.target().headers(),
                      timeout=timeout)


# --- Redis ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_redis_restart_mid_load(stack):
    cfg = lt.LoadConfig(rate=8, duration_s=12, timeout_s=25, seed=1,
                        mix={"text": 0.3, "repeat_image": 0.4, "fresh_image": 0.3})
    t, box = _load_in_background(stack, cfg)
    time.sleep(4)
    stack.redis.stop()
    time.sleep(1.5)
    stack.redis.start()  # same port, empty: everything cached before is gone
    t.join(90)
    report = REPORTS["Redis restarted mid-load"] = box["report"]
    _no_failures(report)
    results = report["_results"]
    start = min(x.sent_at for x in results)
    after = [x for x in results if x.sent_at >= start + 8]  # 2.5 s after Redis came back
    assert after and all(x.outcome == "accepted" for x in after), \
        f"requests after the restart must succeed (automatic reconnect): {[(x.kind, x.status) for x in after]}"
    # cached media is re-encoded after the restart: the repeated image is a miss once, then a hit again
    r = _post(stack, lt.Mix({"repeat_image": 1}, seed=1).body("repeat_image"))
    assert r.status_code == 200, r.text


@pytest.mark.slow
def test_redis_full_reencodes_and_never_serves_a_wrong_embedding(stack, llm):
    from mmpipe import SamplingParams

    mix = lt.Mix({"pool_image": 1}, seed=2)
    sp = SamplingParams(temperature=0.0, max_tokens=mix.max_tokens, ignore_eos=True)
    want = {}
    for i, url in enumerate(mix.pool):
        msgs = mix.pool_body(i)["messages"]
        want[i] = llm.chat(msgs, sp, use_tqdm=False)[0].outputs[0].token_ids
    r = _redis(stack)
    r.flushall()
    # measure one stored embedding, then leave room for about eight more beyond what Redis uses now (the filler below keeps it full): most
    # writes evict another entry, often one a request has been handed but not read yet
    assert _post(stack, mix.pool_body(0)).status_code == 200
    entry = max(int(r.memory_usage(k) or 0) for k in r.keys("*"))
    base = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory-policy", "allkeys-lru")
    # at least 1 MiB of room: Redis counts its clients' query and output buffers in used_memory, and with a
    # few KB of room a burst of writes (or the reconnects after the restart test) is refused with OOM outright
    # instead of evicting; the filler below keeps the cache full either way
    r.config_set("maxmemory", str(base + max(8 * entry, 2**20)))
    evicted0 = int(r.info("stats")["evicted_keys"])
    # another writer keeps the cache full (as other traffic would), so entries are evicted throughout the run,
    # whatever Redis' memory accounting does with the few small embeddings of the tiny model: it writes without a
    # pause until Redis first evicts (the room above is measured after earlier tests, whose client buffers may
    # since have been freed, so it can be several MiB), then one entry every 50 ms
    stop = threading.Event()

    def filler() -> None:
        full = False
        for i in range(20_000):
            if stop.is_set() or (full and stop.wait(0.05)):
                break
            try:
                r.set(f"filler:{i}", os.urandom(entry))
                full = full or int(r.info("stats")["evicted_keys"]) > evicted0
            except Exception:  # OOM refusals are part of the scenario; keep filling
                pass

    th = threading.Thread(target=filler, daemon=True)
    th.start()
    try:
        report = lt.run_load(stack.target(), lt.LoadConfig(rate=10, duration_s=10, timeout_s=25, seed=2,
                                                           mix={"pool_image": 1}), keep_tokens=True)
        evicted = int(r.info("stats")["evicted_keys"]) - evicted0
    finally:
        stop.set()
        th.join(5)
        r.config_set("maxmemory", str(256 * 2**20))
    REPORTS["Redis full (maxmemory ~ one entry, allkeys-lru)"] = report
    ld = report["load"]
    assert ld["lost"] == 0, ld
    bad = [x for x in report["_results"] if x.outcome == "failed"]
    assert not bad, [(x.status, x.detail) for x in bad[:5]]
    accepted = [x for x in report["_results"] if x.outcome == "accepted"]
    assert accepted, (ld, [(x.status, x.detail) for x in report["_results"][:3]])
    wrong = [x.kind for x in accepted if x.token_ids != want[int(x.kind.split(":")[1])]]
    assert not wrong, f"{len(wrong)} answers differ from the offline LLM: {wrong[:5]}"
    assert evicted > 0, "the test did not make Redis evict anything"
    report["evicted_keys"] = evicted


@pytest.mark.slow
def test_generator_rejects_a_stored_embedding_that_does_not_match_its_key(stack):
    """A key overwritten with a payload of another size is a miss, dropped and re-encoded, never served."""
    import torch

    from mmpipe.shared.cache.redis_store import RedisEmbeddingCache
    from mmpipe.shared.types import MMEmbedding

    body = lt.Mix({"fresh_image": 1}, seed=3).body("fresh_image")
    r = _redis(stack)
    before_keys = set(r.scan_iter(match="mmpipe:*", count=1000))
    first = _post(stack, body)
    assert first.status_code == 200, first.text
    keys = [k.decode() for k in set(r.scan_iter(match="mmpipe:*", count=1000)) - before_keys]
    assert len(keys) == 1, keys
    cache = RedisEmbeddingCache(stack.redis.url)
    try:
        (e,) = cache.get_many(keys)
        # a checksummed, well-formed payload that is wrong for its key: one token too many
        t = torch.cat([e.tensor, e.tensor[:1]])
        cache.put_many([(keys[0], MMEmbedding("image", t, {**e.meta, "num_tokens": int(t.shape[0])}))])
        before = stack.stack.metric("generator", "mmpipe_generator_cache_reads_total", result="mismatch")
        again = _post(stack, body)
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["token_ids"] == first.json()["choices"][0]["token_ids"]
        assert stack.stack.metric("generator", "mmpipe_generator_cache_reads_total", result="mismatch") > before
        (fixed,) = cache.get_many(keys)  # the bad entry was dropped and the item re-encoded
        assert fixed is not None and fixed.tensor.shape == e.tensor.shape
    finally:
        cache.close()


# --- stages killed and restarted ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["encoder", "generator", "ingest"])
def test_stage_killed_and_restarted_under_load(stack, stage):
    cfg = lt.LoadConfig(rate=8, duration_s=8, timeout_s=25, seed=10 + len(stage))
    t, box = _load_in_background(stack, cfg)
    time.sleep(2.5)
    stack.stack.procs[stage].kill()
    killed_at = time.monotonic()
    t.join(60)
    report = REPORTS[f"{stage} killed (SIGKILL) under load"] = box["report"]
    _no_failures(report)
    outage = [r for r in report["_results"] if r.sent_at > killed_at + 0.5]
    assert outage, "no request was sent while the stage was down"
    if stage in ("encoder", "ingest"):
        text = [r for r in outage if r.kind == "text"]
        assert text and all(r.outcome == "accepted" for r in text), "text-only requests need neither stage"
    stack.stack.restart(stage)
    assert _wait(lambda: _healthy(stack), 30), f"the gateway did not become healthy after restarting {stage}"
    mix = lt.Mix(lt.DEFAULT_MIX, seed=20 + len(stage))
    asyncio.run(lt.register_uuid(stack.target(), mix, 20))
    for kind in ("text", "repeat_image", "fresh_image", "uuid"):
        r = _post(stack, mix.body(kind))
        assert r.status_code == 200, (kind, r.status_code, r.text)


# --- faults on the new paths (issue 16) -------------------------------------------------------------------------
def _pool_answers(llm, mix: lt.Mix) -> dict[int, list[int]]:
    """The offline LLM's greedy token ids for each image of `mix`'s pool: the answers every 200 must equal."""
    from mmpipe import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=mix.max_tokens, ignore_eos=True)
    return {i: llm.chat(mix.pool_body(i)["messages"], sp, use_tqdm=False)[0].outputs[0].token_ids
            for i in range(len(mix.pool))}


def _wrong(report: dict, want: dict[int, list[int]]) -> list[str]:
    """Kinds of the accepted pool-image answers that differ from `want` (fresh images are not compared)."""
    accepted = [x for x in report["_results"] if x.outcome == "accepted" and x.kind.startswith("pool_image:")]
    assert accepted, report["load"]
    return [x.kind for x in accepted if x.token_ids != want[int(x.kind.split(":")[1])]]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.mark.slow
def test_generator_killed_while_requests_share_prefix_cached_blocks(stack, llm):
    """Six images for 8 req/s: concurrent requests share each image's prompt prefix, cached KV blocks included
    (prefix caching on). The generator is SIGKILLed mid-load and restarted: nothing lost, every failure a 503 with
    Retry-After, every answer before and after the restart the offline LLM's tokens (no stale shared block)."""
    mix = lt.Mix({"pool_image": 1}, seed=40)
    want = _pool_answers(llm, mix)
    cfg = lt.LoadConfig(rate=8, duration_s=10, timeout_s=25, seed=40, mix={"pool_image": 1})
    t, box = _load_in_background(stack, cfg, keep_tokens=True)
    time.sleep(3)
    blocks = stack.stack.metric("generator", "mmpipe_generator_prefix_cache_cached_blocks")
    stack.stack.procs["generator"].kill()
    stack.stack.restart("generator")  # on the same port; the load goes on meanwhile (503 + Retry-After)
    t.join(90)
    report = REPORTS["generator killed (SIGKILL) while requests share prefix-cached blocks"] = box["report"]
    assert blocks > 0, "the prefix cache held no blocks when the generator was killed"
    _no_failures(report)
    # after the restart (a cold prefix cache, then warm again): each image twice, the offline LLM's tokens
    for i in list(range(len(mix.pool))) * 2:
        r = _post(stack, mix.pool_body(i))
        assert r.status_code == 200, r.text
        report["_results"].append(lt.Result(f"pool_image:{i}", "accepted", 200, 0.0,
                                            token_ids=r.json()["choices"][0]["token_ids"]))
    wrong = _wrong(report, want)
    report["wrong_answers"] = len(wrong)
    assert not wrong, f"{len(wrong)} answers differ from the offline LLM: {wrong[:5]}"


@pytest.mark.slow
def test_decode_worker_killed_under_load(stack, llm):
    """Fresh images (each decoded: a cache miss) and pooled ones at 8 req/s through ingest's decode workers;
    a worker SIGKILLed twice mid-load (as the OOM killer would): its item is a retryable 503, the worker is
    replaced, nothing is lost, every other request decodes, every pooled answer equals the offline LLM's."""
    weights = {"fresh_image": 0.6, "pool_image": 0.4}
    mix = lt.Mix(weights, seed=41)
    want = _pool_answers(llm, mix)
    cfg = lt.LoadConfig(rate=8, duration_s=8, timeout_s=25, seed=41, mix=weights)
    t, box = _load_in_background(stack, cfg, keep_tokens=True)
    killed = []
    for _ in range(2):
        time.sleep(2.5)
        workers = _children(stack.stack.procs["ingest"].proc.pid)
        assert workers, "ingest has no decode worker processes (--decode-workers)"
        for w in workers:  # both: one is (most likely) decoding an item right now
            os.kill(w, 9)
        killed += workers
    t.join(60)
    report = REPORTS["decode worker killed (SIGKILL) under load, twice"] = box["report"]
    _no_failures(report)
    wrong = _wrong(report, want)
    report["wrong_answers"] = len(wrong)
    assert not wrong, f"{len(wrong)} answers differ from the offline LLM: {wrong[:5]}"
    assert stack.stack.procs["ingest"].proc.poll() is None, "ingest died with its decode worker"
    from services_helpers import wait_healthy

    wait_healthy(stack.stack.procs["ingest"].addr, 10)
    assert set(_children(stack.stack.procs["ingest"].proc.pid)).isdisjoint(killed)  # replaced
    r = _post(stack, lt.Mix({"fresh_image": 1}, seed=42).body("fresh_image"))
    assert r.status_code == 200, r.text


def _read_stream(url: str, body: dict, out: list, i: int, started: threading.Event) -> None:
    """One SSE stream: ("done", text) after [DONE], ("error", status or message) for a clean error, ("cut", ...)
    when the connection ended without either."""
    import json

    text, t0 = [], time.monotonic()
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            if r.status_code != 200:
                out[i] = ("error", r.status_code, time.monotonic() - t0)
                return
            started.set()
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    out[i] = ("done", "".join(text), time.monotonic() - t0)
                    return
                msg = json.loads(data)
                if "error" in msg:
                    out[i] = ("error", msg["error"].get("message", ""), time.monotonic() - t0)
                    return
                for ch in msg.get("choices", []):
                    text.append(ch.get("delta", {}).get("content") or "")
        out[i] = ("cut", "".join(text), time.monotonic() - t0)
    except httpx.TimeoutException:
        out[i] = ("hung", "".join(text), time.monotonic() - t0)
    except httpx.HTTPError as e:
        out[i] = ("error", type(e).__name__, time.monotonic() - t0)


@pytest.mark.slow
def test_gateway_sigterm_with_streams_open(stack):
    """A second gateway in front of the same stages gets SIGTERM while 8 streams (200 tokens each) are open:
    each finishes (its text equal to the same request answered by the serving gateway) or ends with a clean error,
    none hangs, and the gateway exits within its grace period."""
    from services_helpers import start_gateway_process

    addrs = {n: p.addr for n, p in stack.stack.procs.items()}
    gw = start_gateway_process(stack.model_dir, addrs, stack.stack.log_dir, ["--shutdown-grace-s", "20"])
    try:
        gw.wait_healthy(60)
        body = {"model": "tiny", "max_tokens": 200, "temperature": 0.0, "ignore_eos": True, "stream": True,
                "messages": [{"role": "user", "content": "Tell a long story."}]}
        ref = _post(stack, {**body, "model": lt.MODEL_NAME, "stream": False}, timeout=60)
        assert ref.status_code == 200, ref.text
        want = ref.json()["choices"][0]["message"]["content"]
        n = 8
        out: list = [None] * n
        started = threading.Event()
        threads = [threading.Thread(target=_read_stream, args=(gw.url, body, out, i, started), daemon=True)
                   for i in range(n)]
        for th in threads:
            th.start()
        assert started.wait(20), "no stream started"
        time.sleep(0.3)
        t0 = time.monotonic()
        gw.proc.send_signal(15)
        for th in threads:
            th.join(40)
        code = gw.proc.wait(30)
        exited = time.monotonic() - t0
    finally:
        gw.stop()
    kinds = [o[0] if o else "hung" for o in out]
    finished = [o for o in out if o and o[0] == "done"]
    wrong = [o for o in finished if o[1] != want]
    print(f"gateway SIGTERM with {n} streams open: sent {n}, finished {len(finished)}, clean errors "
          f"{kinds.count('error')}, lost {kinds.count('hung') + kinds.count('cut')}, wrong {len(wrong)}; "
          f"exit {code} after {exited:.1f} s")
    assert "hung" not in kinds and "cut" not in kinds, out
    assert finished and not wrong, out
    assert code == 0 and exited < 25, (code, exited)


# --- overload ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_overload_at_twice_capacity_is_bounded(stack):
    cfg = lt.LoadConfig(duration_s=LOAD_S, ramp_step_s=3, timeout_s=30, seed=30)
    report = lt.run_load(stack.target(), cfg)
    REPORTS[f"2x capacity for {LOAD_S:g} s"] = report
    lt.write_report(report, OUT, "load_test", f"Load test: 2x capacity for {LOAD_S:g} s")
    _no_failures(report)
    ld = report["load"]
    assert ld["rejected"] > 0, "at 2x capacity the gateway must shed load (429 + Retry-After)"
    assert ld["accepted"] > 0
    for name, peak in report["peak_rss_mb"].items():
        assert peak < 3000, f"{name} peaked at {peak} MB"
        assert peak - report["start_rss_mb"][name] < 600, f"{name} grew from {report['start_rss_mb'][name]} MB " \
                                                          f"to {peak} MB under load"


# --- each bound, fast (no stage process) ------------------------------------------------------------------------
class _BlackHole:
    """A TCP port that accepts connections and never answers: a stage call to it waits for its deadline."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def omni_info():
    from mmpipe.services.gateway.model_info import load_model_info
    from mmpipe.shared.models.tiny import ensure_tiny_model

    d = str(ensure_tiny_model("qwen2_5_omni"))
    return d, load_model_info(d)


def test_gateway_max_concurrent_requests_gives_429_with_retry_after_and_hung_stages_504(omni_info):
    from mmpipe.services.gateway.config import GatewayConfig
    from mmpipe.services.gateway.core import GatewayCore
    from mmpipe.services.gateway.http.app import build_app
    from mmpipe.services.gateway.stages import StageClients

    model_dir, info = omni_info
    hole = _BlackHole()
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}

    async def go():
        cfg = GatewayConfig(model=model_dir, served_model_names=("tiny",), max_concurrent_requests=1,
                            request_timeout_s=2.0)
        core = GatewayCore(cfg, info, StageClients(hole.addr, hole.addr, hole.addr))
        app = build_app(core)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            first = asyncio.create_task(c.post("/v1/chat/completions", json=body))
            for _ in range(100):
                if core.in_flight:
                    break
                await asyncio.sleep(0.01)
            second = await c.post("/v1/chat/completions", json=body)
            t0 = time.monotonic()
            r1 = await first
            waited = time.monotonic() - t0
            third = await asyncio.wait_for(c.post("/v1/chat/completions", json=body), 10)
        await core.stages.close()
        return second, r1, third, waited

    try:
        second, first, third, waited = asyncio.run(go())
    finally:
        hole.close()
    assert second.status_code == 429 and second.headers["retry-after"], second.text
    assert "max-concurrent-requests" in second.json()["error"]["message"]
    # a stage that never answers: a retryable 503 (gRPC gave up on the handshake) or the 504 of the request
    # deadline, within the deadline, never a hang
    assert first.status_code in (503, 504) and waited < 5, (first.status_code, first.text)
    assert first.status_code == 504 or first.headers["retry-after"]
    assert third.status_code in (503, 504)  # the slot was released: not a 429


def test_encoder_batcher_queue_is_bounded():
    from concurrent.futures import ThreadPoolExecutor

    from mmpipe.services.encoder.batcher import DynamicBatcher
    from mmpipe.shared.errors import OverloadedError

    release = threading.Event()

    def run_batch(modality, items):
        release.wait(10)
        return list(items)

    async def go():
        pool = ThreadPoolExecutor(1)
        b = DynamicBatcher(run_batch, max_items=1, wait_ms=0, executor=pool, max_queued=2)
        running = asyncio.create_task(b.submit("image", "k0", 0))  # taken by the worker, blocks the tower
        await asyncio.sleep(0.05)
        queued = [asyncio.create_task(b.submit("image", f"k{i}", i)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        assert b.depth() == 2
        with pytest.raises(OverloadedError, match="max-queued-items"):
            await b.submit("image", "k3", 3)
        same = asyncio.create_task(b.submit("image", "k1", 1))  # joins an item in flight: no queue slot
        release.set()
        out = await asyncio.gather(running, *queued, same)
        await b.close()
        pool.shutdown()
        return out

    assert asyncio.run(go()) == [0, 1, 2, 1]


def test_ingest_max_pending_items_gives_resource_exhausted(stage_stack):
    from mmpipe.services.common.stage_clients import EncoderClient, make_channel
    from mmpipe.services.ingest.config import IngestConfig
    from mmpipe.services.ingest.core import IngestCore
    from mmpipe.services.common.convert import MediaSource
    from mmpipe.services.common.metrics import ServiceMetrics
    from mmpipe.shared.errors import OverloadedError
    from mmpipe.shared.models.light import load_preprocess_adapter

    adapter = load_preprocess_adapter(stage_stack.model_dir)
    png = lt.png_bytes(4242)

    async def go():
        cfg = IngestConfig(model=stage_stack.model_dir, encoder_addr=stage_stack.encoder_addr, max_pending_items=1,
                           num_workers=1)
        enc = EncoderClient(make_channel(stage_stack.encoder_addr))
        core = IngestCore(cfg, adapter, enc, ServiceMetrics("ingest_bound_test", cfg.model))
        first = asyncio.create_task(core.ingest([MediaSource("image", data=png)]))
        await asyncio.sleep(0)  # the first request is admitted and working
        with pytest.raises(OverloadedError, match="max-pending-items"):
            await core.ingest([MediaSource("image", data=png)])
        refs = await first
        await core.close()
        return refs

    refs = asyncio.run(go())
    assert len(refs) == 1 and refs[0].num_tokens > 0


def test_stage_errors_carry_retry_after_metadata():
    from mmpipe.services.common.grpc_server import RETRY_AFTER_HEADER, StageInterceptor
    from mmpipe.shared.errors import OverloadedError

    class _Ctx:
        md: list = []

        def set_trailing_metadata(self, md):
            _Ctx.md = list(md)

        async def abort(self, code, msg):
            raise RuntimeError(code.name)

    class _M:
        service = "x"

    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        asyncio.run(StageInterceptor(_M())._fail(OverloadedError("full"), _Ctx(), "Encode"))
    assert (RETRY_AFTER_HEADER, "1") in _Ctx.md
