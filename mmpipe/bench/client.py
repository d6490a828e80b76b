"""The benchmark client: streaming chat requests through the official `openai` client, timed per token.

`run_requests` sends the requests at a request rate (Poisson arrivals; inf: all at once) under an optional cap of
requests in flight (a concurrency; with rate inf that is a closed loop: the next request starts when one ends), and
stops sending after a time limit. Every request has a timeout, so a run ends within the time limit plus one request
timeout. Records are plain dicts (they cross process boundaries in bench/serve_bench.py); `summarize` turns them
into throughput and TTFT / TPOT / ITL / E2E percentiles, all from the client's clock (perf_counter, monotonic).
"""
from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from typing import Any

from .dataset import DEFAULT_PROMPT, chat_messages

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class ClientConfig:
    base_url: str  # the OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str | None = None
    output_tokens: int = 64  # max_tokens of every request
    prompt: str = DEFAULT_PROMPT
    # ask the server to generate exactly output_tokens (vLLM's and mmpipe's `ignore_eos`); a request that streams
    # another count is then an error
    ignore_eos: bool = True
    request_timeout_s: float = 120.0
    temperature: float = 0.0


async def one_request(client: Any, cfg: ClientConfig, images: tuple[bytes, ...]) -> dict:
    """One streaming chat request; the record: start, first, last, end (perf_counter s), n (tokens), itl (s
    between token-carrying chunks), error (None or a message)."""
    rec: dict[str, Any] = {"start": time.perf_counter(), "first": None, "last": None, "n": 0, "itl": [],
                           "error": None}
    extra: dict[str, Any] = {"return_token_ids": True}  # mmpipe / vLLM: exact token counts per chunk
    if cfg.ignore_eos:
        extra["ignore_eos"] = True
    try:
        async def run() -> None:
            stream = await client.chat.completions.create(
                model=cfg.model, messages=chat_messages(images, cfg.prompt), max_tokens=cfg.output_tokens,
                temperature=cfg.temperature, stream=True, stream_options={"include_usage": True}, extra_body=extra)
            async for chunk in stream:
                now = time.perf_counter()
                for ch in chunk.choices:
                    ids = getattr(ch, "token_ids", None)
                    n = len(ids) if ids is not None else (1 if ch.delta and ch.delta.content else 0)
                    if n:
                        if rec["last"] is not None:
                            rec["itl"].append(now - rec["last"])
                        rec["first"] = rec["first"] or now
                        rec["last"] = now
                        rec["n"] += n
                if chunk.usage is not None:
                    rec["usage_tokens"] = chunk.usage.completion_tokens

        await asyncio.wait_for(run(), cfg.request_timeout_s)
    except asyncio.TimeoutError:
        rec["error"] = f"no full answer within {cfg.request_timeout_s:.0f} s"
    except Exception as e:  # noqa: BLE001 - every failure is a counted error, with its message
        rec["error"] = f"{type(e).__name__}: {str(e)[:160]}"
    rec["end"] = time.perf_counter()
    if rec["error"] is None:
        if rec.get("usage_tokens") is not None:
            rec["n"] = rec["usage_tokens"]  # the server's count wins over chunk counting (a chunk may hold several)
        if rec["first"] is None:
            rec["error"] = "no token streamed"
        elif cfg.ignore_eos and rec["n"] != cfg.output_tokens:
            rec["error"] = f"{rec['n']} tokens streamed, {cfg.output_tokens} asked for"
    return rec


async def run_requests(cfg: ClientConfig, requests: list[tuple[bytes, ...]], *, request_rate: float = math.inf,
                       max_concurrency: int | None = None, time_limit_s: float = 60.0,
                       seed: int = 0) -> tuple[list[dict], int, float]:
    """Send `requests` (each a tuple of images) and return (records, requests not sent because the time limit
    passed, wall seconds from the first send to the last answer)."""
    from openai import AsyncOpenAI

    if not request_rate > 0:
        raise ValueError(f"request rate must be positive, got {request_rate}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max concurrency must be at least 1, got {max_concurrency}")
    client = AsyncOpenAI(base_url=cfg.base_url, api_key=cfg.api_key or "unused", max_retries=0,
                         timeout=cfg.request_timeout_s + 5)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    gaps = random.Random(seed)
    recs: list[dict] = []
    tasks: list[asyncio.Task] = []
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s

    async def send(images: tuple[bytes, ...]) -> None:
        try:
            recs.append(await one_request(client, cfg, images))
        finally:
            if slots is not None:
                slots.release()

    sent = 0
    try:
        for images in requests:
            if math.isfinite(request_rate):
                await asyncio.sleep(gaps.expovariate(request_rate))  # Poisson arrivals
            if slots is not None:
                await slots.acquire()
            if time.perf_counter() >= deadline:
                if slots is not None:
                    slots.release()
                break
            tasks.append(asyncio.create_task(send(images)))
            sent += 1
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await client.close()
    wall = (max(r["end"] for r in recs) - t0) if recs else 0.0
    return recs, len(requests) - sent, wall


def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile, linearly interpolated (numpy's default); None for no values."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def rnd(x: float | None, n: int = 2) -> float | None:
    return None if x is None else round(x, n)


def _dist(xs: list[float], digits: int) -> dict[str, float | None]:
    out = {"mean": rnd(sum(xs) / len(xs), digits) if xs else None}
    out.update({f"p{q}": rnd(pct(xs, q), digits) for q in PERCENTILES})
    return out


def summarize(recs: list[dict], not_sent: int, wall: float) -> dict:
    """Throughput over the successful requests and the latency distributions, in ms: ttft (to the first token),
    tpot (per output token after the first, per request), itl (between streamed chunks), e2e (whole request)."""
    ok = [r for r in recs if r["error"] is None]
    ttft = [(r["first"] - r["start"]) * 1e3 for r in ok]
    tpot = [(r["last"] - r["first"]) * 1e3 / (r["n"] - 1) for r in ok if r["n"] > 1]
    itl = [g * 1e3 for r in ok for g in r["itl"]]
    e2e = [(r["end"] - r["start"]) * 1e3 for r in ok]
    errors: dict[str, int] = {}
    for r in recs:
        if r["error"] is not None:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    return {"sent": len(recs), "ok": len(ok), "errors": len(recs) - len(ok), "not_sent": not_sent,
            "wall_s": rnd(wall, 3), "req_per_s": rnd(len(ok) / wall if wall > 0 else None),
            "out_tokens_per_s": rnd(sum(r["n"] for r in ok) / wall if wall > 0 else None, 1),
            "output_tokens": sum(r["n"] for r in ok),
            "ttft_ms": _dist(ttft, 1), "tpot_ms": _dist(tpot, 2), "itl_ms": _dist(itl, 2), "e2e_ms": _dist(e2e, 1),
            "error_messages": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5])}
