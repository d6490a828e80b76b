"""Load test of the whole stack: find its capacity, then drive it at a multiple of it, and report.

    python bench/load_test.py --out-dir build/load            # starts Redis + 3 stages + gateway on the tiny
                                                              # qwen2_vl model (CPU, 127.0.0.1), then tests it
    python bench/load_test.py --url http://127.0.0.1:8000 --api-key KEY --pid gateway=1234 --pid encoder=...

Phases: a short closed-loop ramp (concurrency 1, 2, 4, ... for --ramp-step-s each) measures capacity as the
best rate of answered-200 requests; then an open-loop phase sends requests at --overload x that rate for
--duration-s. The mix (weights in --mix) is text-only, one repeated image (a content-hash hit), fresh random
images (misses: ingest + encoder), and uuid-only references to an image registered first (uuid hits).

Every request is classified:
  accepted  HTTP 200
  rejected  429 or 503 carrying Retry-After (the stack said "not now", as it must when overloaded)
  failed    anything else (other statuses, 429/503 without Retry-After, connection errors)
  lost      sent but not answered within --timeout-s (must be 0: the gateway answers 504 before that)
Latency percentiles (p50/p90/p99) are of accepted requests; peak RSS of each service process is sampled
every 0.2 s (psutil if installed, else /proc). Results go to load_test.json and load_test.md.

Bounded by construction: at most --max-requests requests, at most --max-in-flight at once (requests that
would exceed it are counted as `not_sent`), every phase ends at its time limit, and only 127.0.0.1 is
ever a target.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx

MODEL_NAME = "tiny"
DEFAULT_MIX = {"text": 0.3, "repeat_image": 0.3, "fresh_image": 0.2, "uuid": 0.2}
# Kinds only asked for explicitly: "pool_image" rotates over a fixed set of POOL_SIZE images (tests compare
# each answer with the offline LLM's for the same image).
EXTRA_KINDS = ("pool_image",)
POOL_SIZE = 6


# --- targets ------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A running gateway (127.0.0.1 only) and the pids of the service processes to watch."""

    url: str
    api_key: str | None = None
    pids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        host = urlsplit(self.url).hostname
        if host != "127.0.0.1":
            raise ValueError(f"the load test only targets 127.0.0.1, not {host!r}")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


# --- memory -------------------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int | None:
    """Resident set size of `pid` (None once it has gone)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class MemorySampler:
    """Peak RSS per service, sampled in a thread. `pids` may change (a restarted service): call `watch`."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.2):
        self.pids = dict(pids)
        self.every_s = every_s
        self.peak: dict[str, int] = {}
        self.first: dict[str, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def watch(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def sample(self) -> None:
        for name, pid in list(self.pids.items()):
            r = rss_bytes(pid)
            if r is not None:
                self.first.setdefault(name, r)
                self.peak[name] = max(self.peak.get(name, 0), r)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)
        self.sample()


# --- requests -----------------------------------------------------------------------------------------
def png_bytes(seed: int, h: int = 56, w: int = 56) -> bytes:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def data_url(b: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(b).decode()


def chat_body(parts: list[dict], max_tokens: int) -> dict:
    return {"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe it."}]}]}


class Mix:
    """Builds request bodies by kind; `kinds` weights them. Thread-safe enough for one event loop."""

    def __init__(self, weights: dict[str, float], *, max_tokens: int = 8, seed: int = 0,
                 uuid_name: str | None = None):
        self.weights = {k: v for k, v in weights.items() if v > 0}
        unknown = set(self.weights) - set(DEFAULT_MIX) - set(EXTRA_KINDS)
        if unknown:
            raise ValueError(f"unknown request kinds {sorted(unknown)}; known: {sorted(DEFAULT_MIX)}")
        self.max_tokens = max_tokens
        self.rng = random.Random(seed)
        self.fresh_seed = 1_000_000 + seed * 100_000
        self.repeat_url = data_url(png_bytes(7 + seed))
        self.uuid = uuid_name or f"load-{seed}-{os.getpid()}-{int(time.time())}"
        self.pool = [data_url(png_bytes(500 + i, 112, 112)) for i in range(POOL_SIZE)]

    def register_body(self) -> dict:
        """The request that caches the image named by the uuid (sent once before the load)."""
        return chat_body([{"type": "image_url", "image_url": {"url": data_url(png_bytes(3 + 17 * 1000))},
                           "uuid": self.uuid}], 1)

    def next(self) -> tuple[str, dict]:
        kind = self.rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        if kind == "pool_image":
            i = self.rng.randrange(len(self.pool))
            return f"pool_image:{i}", self.pool_body(i)
        return kind, self.body(kind)

    def pool_body(self, i: int) -> dict:
        return chat_body([{"type": "image_url", "image_url": {"url": self.pool[i]}}], self.max_tokens)

    def body(self, kind: str) -> dict:
        if kind == "text":
            return chat_body([], self.max_tokens)
        if kind == "repeat_image":
            return chat_body([{"type": "image_url", "image_url": {"url": self.repeat_url}}], self.max_tokens)
        if kind == "fresh_image":
            self.fresh_seed += 1
            return chat_body([{"type": "image_url", "image_url": {"url": data_url(png_bytes(self.fresh_seed))}}],
                             self.max_tokens)
        if kind == "uuid":
            return chat_body([{"type": "image_url", "image_url": None, "uuid": self.uuid}], self.max_tokens)
        raise ValueError(kind)


@dataclass
class Result:
    kind: str
    outcome: str  # accepted | rejected | failed | lost
    status: int | None
    latency_s: float
    detail: str = ""
    token_ids: list[int] | None = None
    sent_at: float = 0.0


def classify(status: int, headers: httpx.Headers) -> str:
    if status == 200:
        return "accepted"
    if status in (429, 503) and headers.get("retry-after"):
        return "rejected"
    return "failed"


async def send(client: httpx.AsyncClient, target: Target, kind: str, body: dict, timeout_s: float,
               keep_tokens: bool = False) -> Result:
    t0 = time.monotonic()
    try:
        r = await asyncio.wait_for(client.post(f"{target.url}/v1/chat/completions", json=body,
                                               headers=target.headers(), timeout=timeout_s + 5), timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return Result(kind, "lost", None, time.monotonic() - t0, "no answer within the timeout", sent_at=t0)
    except httpx.HTTPError as e:
        return Result(kind, "failed", None, time.monotonic() - t0, f"{type(e).__name__}: {e}", sent_at=t0)
    dt = time.monotonic() - t0
    outcome = classify(r.status_code, r.headers)
    detail, ids = "", None
    if outcome == "accepted":
        if keep_tokens:
            ids = r.json()["choices"][0].get("token_ids")
    else:
        try:
            detail = r.json()["error"]["message"][:200]
        except (ValueError, KeyError, TypeError):
            detail = r.text[:200]
    return Result(kind, outcome, r.status_code, dt, detail, ids, t0)


# --- phases -------------------------------------------------------------------------------------------
async def closed_loop(target: Target, mix: Mix, concurrency: int, duration_s: float, timeout_s: float,
                      max_requests: int) -> list[Result]:
    """`concurrency` workers, each sending the next request when its last one is answered."""
    results: list[Result] = []
    end = time.monotonic() + duration_s
    # keepalive_expiry under uvicorn's 5 s keep-alive: never reuse a connection the server is closing
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4,
                          keepalive_expiry=1.0)
    async with httpx.AsyncClient(limits=limits) as client:
        async def worker() -> None:
            while time.monotonic() < end and len(results) < max_requests:
                kind, body = mix.next()
                results.append(await send(client, target, kind, body, timeout_s))

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return results


async def open_loop(target: Target, mix: Mix, rate: float, duration_s: float, timeout_s: float,
                    max_requests: int, max_in_flight: int, keep_tokens: bool = False,
                    on_result: Callable[[Result], None] | None = None) -> tuple[list[Result], int]:
    """Poisson-free fixed-rate arrivals for `duration_s` (at most `max_requests`); returns (results, not_sent).

    Ends at most `timeout_s` after the last send, since each request is bounded by it."""
    results: list[Result] = []
    not_sent = 0
    tasks: set[asyncio.Task] = set()
    interval = 1.0 / max(rate, 1e-6)
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=min(max_in_flight, 64),
                          keepalive_expiry=1.0)
    async with httpx.AsyncClient(limits=limits) as client:
        async def one(kind: str, body: dict) -> None:
            r = await send(client, target, kind, body, timeout_s, keep_tokens)
            results.append(r)
            if on_result is not None:
                on_result(r)

        start = time.monotonic()
        n = 0
        while n < max_requests:
            due = start + n * interval
            if due - start >= duration_s:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            n += 1
            if len(tasks) >= max_in_flight:
                not_sent += 1
                continue
            kind, body = mix.next()
            t = asyncio.create_task(one(kind, body))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s + 10)
    return results, not_sent


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(q / 100.0 * (len(xs) - 1)))))
    return xs[i]


def summarize(results: list[Result], duration_s: float, not_sent: int = 0) -> dict[str, Any]:
    by = {k: sum(1 for r in results if r.outcome == k) for k in ("accepted", "rejected", "failed", "lost")}
    lat = [r.latency_s for r in results if r.outcome == "accepted"]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    kinds: dict[str, dict[str, int]] = {}
    for r in results:
        kinds.setdefault(r.kind, {}).setdefault(r.outcome, 0)
        kinds[r.kind][r.outcome] += 1
    failures: dict[str, int] = {}
    for r in results:
        if r.outcome in ("failed", "lost"):
            key = f"{r.status} {r.detail[:120]}"
            failures[key] = failures.get(key, 0) + 1
    return {
        "sent": len(results), "not_sent": not_sent, **by, "duration_s": round(duration_s, 2),
        "accepted_per_s": round(by["accepted"] / duration_s, 2) if duration_s > 0 else None,
        "latency_s": {f"p{q}": (round(v, 4) if (v := percentile(lat, q)) is not None else None)
                      for q in (50, 90, 99)},
        "statuses": statuses, "by_kind": kinds,
        "failures": dict(sorted(failures.items(), key=lambda kv: -kv[1])[:10]),
    }


@dataclass
class LoadConfig:
    ramp_levels: tuple[int, ...] = (1, 2, 4, 8, 16)
    ramp_step_s: float = 4.0
    overload: float = 2.0
    duration_s: float = 60.0
    timeout_s: float = 30.0
    max_requests: int = 20_000
    max_in_flight: int = 256
    max_tokens: int = 8
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    seed: int = 0
    rate: float | None = None  # skip the ramp and use this rate (requests/s) for the load phase


async def register_uuid(target: Target, mix: Mix, timeout_s: float) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{target.url}/v1/chat/completions", json=mix.register_body(),
                              headers=target.headers(), timeout=timeout_s)
        r.raise_for_status()


async def find_capacity(target: Target, mix: Mix, cfg: LoadConfig) -> tuple[float, list[dict]]:
    """Best accepted-requests-per-second over the ramp levels (stops once throughput stops growing)."""
    steps: list[dict] = []
    best = 0.0
    for c in cfg.ramp_levels:
        t0 = time.monotonic()
        res = await closed_loop(target, mix, c, cfg.ramp_step_s, cfg.timeout_s, cfg.max_requests)
        dt = time.monotonic() - t0
        s = summarize(res, dt)
        s["concurrency"] = c
        steps.append(s)
        rate = s["accepted"] / dt if dt > 0 else 0.0
        if rate < best * 1.1 and c > cfg.ramp_levels[0]:
            best = max(best, rate)
            break  # saturated
        best = max(best, rate)
    return best, steps


def run_load(target: Target, cfg: LoadConfig, *, keep_tokens: bool = False,
             on_result: Callable[[Result], None] | None = None,
             sampler: MemorySampler | None = None) -> dict[str, Any]:
    """Ramp (unless cfg.rate), then the load phase; returns the report (and the raw results under "_results")."""
    mix = Mix(cfg.mix, max_tokens=cfg.max_tokens, seed=cfg.seed)

    async def main() -> dict[str, Any]:
        if "uuid" in mix.weights:
            await register_uuid(target, mix, cfg.timeout_s)
        ramp: list[dict] = []
        if cfg.rate is None:
            capacity, ramp = await find_capacity(target, mix, cfg)
            rate = max(0.5, capacity * cfg.overload)
        else:
            capacity, rate = None, cfg.rate
        t0 = time.monotonic()
        res, not_sent = await open_loop(target, mix, rate, cfg.duration_s, cfg.timeout_s, cfg.max_requests,
                                        cfg.max_in_flight, keep_tokens, on_result)
        dt = time.monotonic() - t0
        return {"capacity_per_s": round(capacity, 2) if capacity is not None else None,
                "offered_rate_per_s": round(rate, 2), "ramp": ramp,
                "load": summarize(res, dt, not_sent), "_results": res}

    own = sampler is None
    sampler = sampler or MemorySampler(target.pids)
    if own:
        sampler.__enter__()
    try:
        report = asyncio.run(main())
    finally:
        if own:
            sampler.__exit__(None, None, None)
    report["peak_rss_mb"] = {k: round(v / 2**20, 1) for k, v in sorted(sampler.peak.items())}
    report["start_rss_mb"] = {k: round(v / 2**20, 1) for k, v in sorted(sampler.first.items())}
    report["config"] = {k: v for k, v in cfg.__dict__.items()}
    report["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    return report


# --- reports ------------------------------------------------------------------------------------------
def to_markdown(report: dict[str, Any], title: str = "Load test") -> str:
    ld = report["load"]
    lines = [f"## {title}", "",
             f"Machine: {report['machine']['cpus']} CPU cores, CPU only; capacity (ramp) "
             f"{report['capacity_per_s']} req/s; offered {report['offered_rate_per_s']} req/s for "
             f"{ld['duration_s']} s.", "",
             "| sent | accepted | rejected (429/503 + Retry-After) | failed | lost | not sent (client cap) |"
             " p50 s | p90 s | p99 s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {ld['sent']} | {ld['accepted']} | {ld['rejected']} | {ld['failed']} | {ld['lost']} | "
             f"{ld['not_sent']} | {ld['latency_s']['p50']} | {ld['latency_s']['p90']} | {ld['latency_s']['p99']} |",
             "", "| service | RSS at start (MB) | peak RSS (MB) |", "|---|---:|---:|"]
    for k, v in report["peak_rss_mb"].items():
        lines.append(f"| {k} | {report['start_rss_mb'].get(k)} | {v} |")
    lines += ["", f"Statuses: {ld['statuses']}; by kind: {ld['by_kind']}"]
    if ld["failures"]:
        lines += ["", f"Failures: {ld['failures']}"]
    if report.get("ramp"):
        lines += ["", "Ramp: " + "; ".join(f"c={s['concurrency']}: {s['accepted_per_s']} req/s "
                                           f"(p50 {s['latency_s']['p50']} s)" for s in report["ramp"])]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path, name: str = "load_test", title: str = "Load test") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in report.items() if not k.startswith("_")}
    (out_dir / f"{name}.json").write_text(json.dumps(clean, indent=2, default=str))
    (out_dir / f"{name}.md").write_text(to_markdown(report, title))


# --- the stack, started like the e2e tests -----------------------------------------------------------
GATEWAY_ARGS = ("--max-concurrent-requests", "16", "--request-timeout", "20")


class Stack:
    """Redis + ingest + encoder + generator + gateway on 127.0.0.1 (tests/services_helpers.py).

    `redis_url`: a Redis the caller runs (e.g. a redis+cluster:// URL); the stack then starts none and leaves it
    alone when it stops (`redis` is None)."""

    def __init__(self, model_dir: str, *, redis_port: int | None = None, redis_maxmemory: str = "256mb",
                 gateway_args: tuple[str, ...] = GATEWAY_ARGS, api_key: str = "sk-load",
                 stage_args: dict[str, list[str]] | None = None, redis_url: str | None = None):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from mmpipe.shared.cache.embedded_redis import EmbeddedRedis, free_port

        self.model_dir = model_dir
        self.api_key = api_key
        self.redis = None if redis_url else EmbeddedRedis(port=redis_port or free_port(),
                                                          maxmemory=redis_maxmemory).start()
        self.redis_url = redis_url or self.redis.url
        self.stack = None
        self.gw = None
        self.gateway_args = tuple(gateway_args)
        self.stage_args = stage_args or {}
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        import subprocess

        from services_helpers import StageStack, start_stage_process, wait_healthy

        from mmpipe.shared.cache.embedded_redis import free_port

        self.stack = StageStack(self.model_dir, self.redis_url)
        sa = self.stage_args
        enc = start_stage_process("encoder", self.model_dir, self.redis_url, log_dir=self.stack.log_dir, wait=False,
                                  extra=sa.get("encoder"))
        gen = start_stage_process("generator", self.model_dir, self.redis_url, log_dir=self.stack.log_dir,
                                  wait=False, extra=sa.get("generator"))
        ing = start_stage_process("ingest", self.model_dir, self.redis_url, encoder_addr=enc.addr,
                                  log_dir=self.stack.log_dir, wait=False, extra=sa.get("ingest"))
        self.stack.procs = {"encoder": enc, "generator": gen, "ingest": ing}
        port, gport = free_port(), free_port()
        self.gw_log = self.stack.log_dir / f"gateway-{port}.log"
        argv = [sys.executable, "-m", "mmpipe.cli", "gateway", "--model", self.model_dir,
                "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
                "--grpc-port", str(gport), "--ingest-addr", ing.addr, "--encoder-addr", enc.addr,
                "--generator-addr", gen.addr, "--redis-url", self.redis_url, "--api-key", self.api_key,
                "--shutdown-grace-s", "5", *self.gateway_args]
        with open(self.gw_log, "ab") as out:
            self.gw = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
        self.url = f"http://127.0.0.1:{port}"
        for p in self.stack.procs.values():
            wait_healthy(p.addr, 120, p.proc, p.log_path)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.gw.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gateway not healthy; log tail:\n{self.gw_log.read_text(errors='replace')[-3000:]}")

    def pids(self) -> dict[str, int]:
        out = {n: p.proc.pid for n, p in self.stack.procs.items()} if self.stack else {}
        if self.gw is not None:
            out["gateway"] = self.gw.pid
        if self.redis is not None and self.redis.pid:
            out["redis"] = self.redis.pid
        return out

    def target(self) -> Target:
        return Target(self.url, self.api_key, self.pids())

    def stop(self) -> None:
        import signal
        import subprocess

        if self.gw is not None and self.gw.poll() is None:
            self.gw.send_signal(signal.SIGTERM)
            try:
                self.gw.wait(15)
            except subprocess.TimeoutExpired:
                self.gw.kill()
                self.gw.wait(5)
        if self.stack is not None:
            self.stack.stop()
        if self.redis is not None:
            self.redis.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running gateway on 127.0.0.1 (default: start a tiny stack)")
    p.add_argument("--api-key", default=os.environ.get("MMPIPE_API_KEY"))
    p.add_argument("--pid", action="append", default=[], metavar="NAME=PID", help="a service process to watch")
    p.add_argument("--model", default=None, help="model of the started stack (default: the tiny qwen2_vl)")
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--overload", type=float, default=2.0, help="load phase rate as a multiple of capacity")
    p.add_argument("--rate", type=float, default=None, help="skip the ramp: requests/s of the load phase")
    p.add_argument("--ramp-step-s", type=float, default=4.0)
    p.add_argument("--timeout-s", type=float, default=30.0)
    p.add_argument("--max-requests", type=int, default=20_000)
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--mix", default=json.dumps(DEFAULT_MIX), help="JSON weights of " + ", ".join(DEFAULT_MIX))
    p.add_argument("--out-dir", default="build/load")
    a = p.parse_args(argv)
    cfg = LoadConfig(overload=a.overload, duration_s=a.duration_s, timeout_s=a.timeout_s,
                     max_requests=a.max_requests, max_in_flight=a.max_in_flight, max_tokens=a.max_tokens,
                     mix=json.loads(a.mix), rate=a.rate, ramp_step_s=a.ramp_step_s)
    stack = None
    if a.url:
        target = Target(a.url, a.api_key, {k: int(v) for k, v in (x.split("=", 1) for x in a.pid)})
    else:
        from mmpipe.shared.models.tiny import ensure_tiny_model

        stack = Stack(a.model or str(ensure_tiny_model("qwen2_vl")))
        target = stack.target()
    try:
        report = run_load(target, cfg)
    finally:
        if stack is not None:
            stack.stop()
    write_report(report, Path(a.out_dir))
    print(to_markdown(report))
    return 0 if report["load"]["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
