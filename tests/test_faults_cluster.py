"""A Redis Cluster master SIGKILLed and restarted under load, the whole served stack on the cluster (`make test-slow`).

Redis + ingest + encoder + generator + gateway (bench/load_test.py's `Stack`, as tests/test_faults.py starts it),
with the embedding cache on a real 3-node Redis Cluster (tests/redis_cluster_helpers.py, `redis+cluster://`). A
closed loop of image chats (six repeated images, unique ones, uuid-only references registered first) runs while the
master holding the first uuid's entry (and about a third of the others) is SIGKILLed and, 3 s later, started again
on its port.

The node comes back with its cluster config file (its node id, epoch and slots: it rejoins by itself, as a pod
restarted on its volume does) but without a dataset: the cache keeps nothing on disk (`--save ""`), so the restart
loses that node's share of the entries, the harder case (keys handed out before the crash vanish before the
generator reads them). Without the config file the node would come back a stranger owning no slots, and its
slots would stay uncovered until an operator re-added them: that is an outage to repair, not a restart.

In the services the cache is also the hop between encoder and generator (the generator reads every embedding from
it), so while a node is down a request whose item's key lies in its slots cannot be served: it must get a clean
error (429/503 + Retry-After), never a 500, a hang or a wrong answer; items on the two live nodes are served. A
uuid-only item whose entry died with the node gets a clean 400 naming the uuid. Once the node is back the stack
serves every request again, through the same processes (the cluster clients rediscover the node).

Each 200 is compared with the offline `mmpipe.LLM`'s greedy tokens for its image. Bounded: at most MAX_REQUESTS
requests in LOAD_S seconds, each within its timeout; only 127.0.0.1.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import load_test as lt  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "build" / "faults"
GATEWAY_ARGS = ("--max-concurrent-requests", "8", "--request-timeout", "15")
CONCURRENCY = 4
PAUSE_S = 0.15  # each worker's pause between requests: ~20 req/s, so that the count does not end the run early
MAX_REQUESTS = 240
LOAD_S = 12.0
KILL_AT_S, DOWN_S = 3.0, 3.0
SETTLE_S = 1.0  # after the node answers again, before every request must succeed
TIMEOUT_S = 25.0  # a request not answered by then is lost (the gateway's own deadline is 15 s)
UUIDS = 3


@pytest.fixture(scope="module")
def cluster():
    from redis_cluster_helpers import EmbeddedRedisCluster

    # node timeout 2 s: the 3 s outage is long enough for the live masters to mark the dead one FAIL, as in a
    # real crash, and the restart clears it (a master still owning its slots, nobody to fail over to)
    with EmbeddedRedisCluster(node_timeout_ms=2000) as c:
        yield c


@pytest.fixture(scope="module")
def stack(cluster):
    from mmpipe.shared.models.tiny import ensure_tiny_model

    s = lt.Stack(str(ensure_tiny_model("qwen2_vl")), redis_url=cluster.url, gateway_args=GATEWAY_ARGS)
    yield s
    s.stop()


@dataclass
class Sent:
    kind: str  # repeat | unique | uuid
    image: str  # the image's name: its reference answer's key
    sent_at: float
    status: int | None = None  # None: no answer within TIMEOUT_S (lost)
    retry_after: str | None = None
    message: str = ""
    token_ids: list[int] | None = None
    latency_s: float = 0.0


class Images:
    """Every image the load may send, by name, and the chat body for it (what `lt.Mix` builds)."""

    def __init__(self, seed: int = 60):
        mix = lt.Mix({"pool_image": 1}, seed=seed)
        self.urls = {f"repeat:{i}": u for i, u in enumerate(mix.pool)}
        self.urls.update({f"unique:{i}": lt.data_url(lt.png_bytes(3_000_000 + i)) for i in range(MAX_REQUESTS)})
        self.urls.update({f"uuid:{i}": lt.data_url(lt.png_bytes(3_500_000 + i, 84, 84)) for i in range(UUIDS)})
        self.uuid = {f"uuid:{i}": f"cluster-fault-{seed}-{i}-{time.time_ns()}" for i in range(UUIDS)}
        self.max_tokens = mix.max_tokens

    def body(self, name: str, *, register: bool = False) -> dict:
        if name.startswith("uuid:"):
            part = {"type": "image_url", "image_url": {"url": self.urls[name]} if register else None,
                    "uuid": self.uuid[name]}
        else:
            part = {"type": "image_url", "image_url": {"url": self.urls[name]}}
        return lt.chat_body([part], self.max_tokens)


def _closed_loop(url: str, headers: dict, images: Images, out: list[Sent], stop_at: float) -> None:
    """CONCURRENCY workers, each sending its next request PAUSE_S after the last one is answered, until `stop_at`
    or MAX_REQUESTS; the kind cycles repeat, unique, repeat, uuid, repeat, unique, ..."""
    lock = threading.Lock()
    counter = iter(range(MAX_REQUESTS))
    cycle = ("repeat", "unique", "repeat", "uuid", "repeat", "unique")

    def worker() -> None:
        with httpx.Client(timeout=TIMEOUT_S) as client:
            while time.monotonic() < stop_at:
                time.sleep(PAUSE_S)
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                kind = cycle[n % len(cycle)]
                name = {"repeat": f"repeat:{n % 6}", "unique": f"unique:{n}", "uuid": f"uuid:{n % UUIDS}"}[kind]
                s = Sent(kind, name, time.monotonic())
                try:
                    r = client.post(f"{url}/v1/chat/completions", json=images.body(name), headers=headers)
                except httpx.TimeoutException:
                    s.latency_s = time.monotonic() - s.sent_at
                    out.append(s)
                    continue
                except httpx.HTTPError as e:
                    s.status, s.message = -1, f"{type(e).__name__}: {e}"
                    out.append(s)
                    continue
                s.latency_s = time.monotonic() - s.sent_at
                s.status, s.retry_after = r.status_code, r.headers.get("retry-after")
                if r.status_code == 200:
                    s.token_ids = r.json()["choices"][0]["token_ids"]
                else:
                    try:
                        s.message = r.json()["error"]["message"][:200]
                    except (ValueError, KeyError, TypeError):
                        s.message = r.text[:200]
                out.append(s)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(CONCURRENCY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LOAD_S + TIMEOUT_S + 10)


def _outcome(s: Sent, want: dict[str, list[int]]) -> str:
    if s.status is None:
        return "lost"
    if s.status == 200:
        return "ok" if s.token_ids == want[s.image] else "wrong"
    if s.status in (429, 503) and s.retry_after:
        return "clean"
    if s.status == 400 and s.kind == "uuid" and "not in the embedding cache" in s.message:
        return "clean"  # its embedding existed only on the node that lost its data
    return "other"


def _keys_on(cluster, i: int) -> list[bytes]:
    return list(cluster.client(i).scan_iter(match="mmpipe:*", count=1000))


@pytest.mark.slow
def test_cluster_master_killed_and_restarted_under_load(cluster, stack):
    from mmpipe import LLM, SamplingParams

    images = Images()
    headers = stack.target().headers()

    def post(name: str, register: bool = False) -> httpx.Response:
        return httpx.post(f"{stack.url}/v1/chat/completions", json=images.body(name, register=register),
                          headers=headers, timeout=TIMEOUT_S)

    for name in [*images.uuid, *(f"repeat:{i}" for i in range(6))]:  # registered, and the pool cached
        r = post(name, register=True)
        assert r.status_code == 200, r.text
    counts = [len(_keys_on(cluster, i)) for i in range(cluster.n)]
    assert all(counts), f"entries did not spread over the nodes: {counts}"
    # the victim holds uuid:0's entry, so the run has a uuid-only item whose embedding exists only on the dead node
    victim = next(i for i in range(cluster.n) if any(images.uuid["uuid:0"].encode() in k for k in _keys_on(cluster, i)))

    sent: list[Sent] = []
    t0 = time.monotonic()
    loop = threading.Thread(target=_closed_loop, args=(stack.url, headers, images, sent, t0 + LOAD_S), daemon=True)
    loop.start()
    time.sleep(KILL_AT_S)
    killed_at = time.monotonic()
    cluster.kill_node(victim)
    time.sleep(DOWN_S)
    cluster.start_node(victim)  # same port, its cluster config file, no data; returns once every node says ok
    back_at = time.monotonic()
    loop.join(LOAD_S + TIMEOUT_S + 15)
    assert not loop.is_alive(), "the load did not end"
    elapsed = time.monotonic() - t0

    # after the run: each image once more, all must be served (uuid-only ones whose entry died: a clean 400, then
    # registered again and served), and the restarted node holds entries written after its restart
    after: list[Sent] = []
    for name in [*(f"repeat:{i}" for i in range(6)), "unique:0", *images.uuid]:
        r = post(name)
        if r.status_code == 400 and name.startswith("uuid:"):
            assert "not in the embedding cache" in r.json()["error"]["message"], r.text
            r = post(name, register=True)
        assert r.status_code == 200, (name, r.status_code, r.text)
        after.append(Sent(name.split(":")[0], name, 0.0, 200, token_ids=r.json()["choices"][0]["token_ids"]))
    assert _keys_on(cluster, victim), "nothing was written to the restarted node"
    ready = time.monotonic() + 10
    while httpx.get(f"{stack.url}/health", timeout=2).status_code != 200 and time.monotonic() < ready:
        time.sleep(0.2)
    assert httpx.get(f"{stack.url}/health", timeout=2).status_code == 200, "the gateway's cache check did not recover"

    t_ref = time.monotonic()
    llm = LLM(stack.model_dir, device="cpu")
    sp = SamplingParams(temperature=0.0, max_tokens=images.max_tokens, ignore_eos=True)
    names = sorted({s.image for s in sent + after if s.status == 200})
    outs = llm.chat([images.body(n, register=True)["messages"] for n in names], sp, use_tqdm=False)
    want = {n: o.outputs[0].token_ids for n, o in zip(names, outs)}

    outcomes = [_outcome(s, want) for s in sent]
    phase = ["before" if s.sent_at < killed_at else "outage" if s.sent_at < back_at else
             "settling" if s.sent_at < back_at + SETTLE_S else "after" for s in sent]
    report = {
        "sent": len(sent), **{k: outcomes.count(k) for k in ("ok", "clean", "lost", "wrong", "other")},
        "statuses": {str(st): sum(1 for s in sent if s.status == st) for st in sorted({s.status or 0 for s in sent})},
        "statuses_by_phase": {p: {str(st): sum(1 for s, q in zip(sent, phase) if q == p and s.status == st)
                                  for st in sorted({s.status or 0 for s in sent})} for p in dict.fromkeys(phase)},
        "by_phase": {p: {k: sum(1 for o, q in zip(outcomes, phase) if q == p and o == k)
                         for k in ("ok", "clean", "lost", "wrong", "other")} for p in ("before", "outage", "settling",
                                                                                        "after")},
        "outage_s": round(back_at - killed_at, 2), "load_s": round(elapsed, 1),
        "reference_s": round(time.monotonic() - t_ref, 1),
        "keys_per_node_before": counts, "victim": victim,
        "p50_p99_ok_s": [lt.percentile([s.latency_s for s, o in zip(sent, outcomes) if o == "ok"], q)
                         for q in (50, 99)],
        "after_run": {"served": len(after), "wrong": sum(s.token_ids != want[s.image] for s in after)},
        "clean_errors": sorted({f"{s.status} {s.message[:100]}" for s, o in zip(sent, outcomes) if o == "clean"}),
        "failures": sorted({f"{s.status} {s.message[:100]}" for s, o in zip(sent, outcomes)
                            if o in ("other", "lost")}),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cluster_node_restart.json").write_text(json.dumps(report, indent=2))
    print("Redis Cluster master SIGKILLed and restarted under load:", json.dumps(report))

    assert report["lost"] == 0 and report["other"] == 0, report
    assert report["wrong"] == 0 and report["after_run"]["wrong"] == 0, report
    assert report["by_phase"]["outage"]["ok"] > 0, f"the live nodes' share must be served during the outage: {report}"
    late = [(s.image, s.status, s.message) for s, q in zip(sent, phase) if q == "after" and s.status != 200
            and not (s.kind == "uuid" and s.status == 400)]
    assert any(q == "after" for q in phase) and not late, f"after the restart every request must be served: {late}"
