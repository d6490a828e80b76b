"""The gateway's Prometheus metrics (prefix `mmpipe_gateway_`, base units, a `model` label, no colons).

The core times every request through `RequestMetrics` (latency, TTFT, TPOT, tokens, in flight, and the request's
span when tracing), and its steps in `STEP_DURATION` (parse, template, tokenize, resolve, first_token: the scheme
of every stage, services/common/steps.py); each transport counts its requests in `REQUESTS` with the status it
actually answered: `endpoint` is the HTTP path or `grpc:<Method>`, `status` the HTTP status code or the gRPC code
name.

With --api-server-count N > 1 (services/gateway/workers.py) the workers run in Prometheus multiprocess mode
(PROMETHEUS_MULTIPROC_DIR): `render` merges every worker's metrics (gauges: the sum over live workers) and adds
each live worker's process metrics with a `worker` label, so one scrape of any worker sees the whole gateway.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector

from mmpipe.services.common.steps import STEP_BUCKETS, STEP_DOC

from . import access_log

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter("mmpipe_gateway_requests", "Requests finished, by endpoint and status code.",
                   ("model", "endpoint", "status"))
REQUEST_LATENCY = Histogram("mmpipe_gateway_request_duration_seconds", "End-to-end request latency.",
                            ("model", "endpoint"), buckets=_LATENCY_BUCKETS)
TTFT = Histogram("mmpipe_gateway_time_to_first_token_seconds",
                 "Time from request arrival to the first generated token.", ("model",), buckets=_LATENCY_BUCKETS)
TPOT = Histogram("mmpipe_gateway_time_per_output_token_seconds",
                 "Mean time between generated tokens after the first, per request.", ("model",),
                 buckets=_TPOT_BUCKETS)
PROMPT_TOKENS = Counter("mmpipe_gateway_prompt_tokens", "Prompt tokens (after placeholder expansion).", ("model",))
GENERATION_TOKENS = Counter("mmpipe_gateway_generation_tokens", "Generated tokens.", ("model",))
IN_FLIGHT = Gauge("mmpipe_gateway_requests_in_flight", "Requests being served right now.", ("model",),
                  multiprocess_mode="livesum")
MM_CACHE_HITS = Counter("mmpipe_gateway_mm_cache_hits",
                        "Media items whose embedding was already cached, as seen by the gateway "
                        "(how: uuid = look-up by UUID, hash = ingest found the content hash).",
                        ("model", "modality", "how"))
MM_CACHE_MISSES = Counter("mmpipe_gateway_mm_cache_misses",
                          "Media items that had to be preprocessed and encoded.", ("model", "modality"))
STEP_DURATION = Histogram("mmpipe_gateway_step_duration_seconds", STEP_DOC, ("model", "step"), buckets=STEP_BUCKETS)
CONNECTIONS = Counter("mmpipe_gateway_http_connections", "HTTP connections accepted.", ("model",))
OPEN_CONNECTIONS = Gauge("mmpipe_gateway_http_open_connections", "HTTP connections open right now.", ("model",),
                         multiprocess_mode="livesum")
CONNECTIONS_CUT = Counter("mmpipe_gateway_http_requests_cut",
                          "Requests refused before their body was used, and the connection closed (reason: "
                          "header_timeout, body_timeout, body_too_large).", ("reason",))
STAGE_ERRORS = Counter("mmpipe_gateway_stage_errors", "Failed stage calls, by stage and gRPC code.",
                       ("stage", "code"))
# Routing over generator replicas (services/gateway/routing.py): `replica` is the address given in --generator-addr.
ROUTED = Counter("mmpipe_gateway_routed_requests", "Generate calls sent to each generator replica.",
                 ("model", "replica"))
ROUTING_DECISIONS = Counter("mmpipe_gateway_routing_decisions",
                            "How each Generate call picked its replica (logic: --routing-logic; decision: hit = the "
                            "replica its prefix or session hashes to, fallback = that one was saturated so the least "
                            "loaded one, no_prefix = shorter than one block (least loaded), roundrobin).",
                            ("model", "logic", "decision"))
REPLICA_IN_FLIGHT = Gauge("mmpipe_gateway_replica_requests_in_flight",
                          "Generate calls in flight per generator replica, as this gateway counts them.",
                          ("model", "replica"), multiprocess_mode="livesum")


def render() -> tuple[bytes, str]:
    """The exposition text and its content type (all workers' metrics with --api-server-count > 1)."""
    mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not mp_dir:
        return generate_latest(), CONTENT_TYPE_LATEST
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=mp_dir)
    registry.register(WorkerProcessCollector(mp_dir))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class WorkerProcessCollector:
    """`process_*` metrics of every live gateway worker (read from /proc), labelled with the worker's index."""

    def __init__(self, mp_dir: str):
        self.mp_dir = mp_dir

    def collect(self) -> Iterable[Metric]:
        from .workers import worker_pids

        merged: dict[str, Metric] = {}
        for index, pid in sorted(worker_pids(self.mp_dir).items()):
            for fam in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                out = merged.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
                for smp in fam.samples:
                    out.add_sample(smp.name, {**smp.labels, "worker": index}, smp.value)
        return list(merged.values())


class RequestMetrics:
    """Timing of one request: arrival, first token, last token; recorded once by `finish`."""

    __slots__ = ("model", "endpoint", "start", "first_token_at", "last_token_at", "n_tokens", "_done", "span")

    def __init__(self, model: str, endpoint: str):
        self.model = model
        self.endpoint = endpoint
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.n_tokens = 0
        self._done = False
        self.span = None  # the request's tracing.OpenSpan, ended with the request (tracing on)
        IN_FLIGHT.labels(model).inc()

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            TTFT.labels(self.model).observe(now - self.start)
        self.last_token_at = now
        self.n_tokens += n

    def finish(self, status: int, *, prompt_tokens: int = 0) -> None:
        if self._done:
            return
        self._done = True
        IN_FLIGHT.labels(self.model).dec()
        REQUEST_LATENCY.labels(self.model, self.endpoint).observe(time.perf_counter() - self.start)
        if prompt_tokens:
            PROMPT_TOKENS.labels(self.model).inc(prompt_tokens)
        if self.n_tokens:
            GENERATION_TOKENS.labels(self.model).inc(self.n_tokens)
        access_log.record_tokens(prompt_tokens, self.n_tokens)
        if self.n_tokens > 1 and self.first_token_at is not None and self.last_token_at is not None:
            TPOT.labels(self.model).observe((self.last_token_at - self.first_token_at) / (self.n_tokens - 1))
        if self.span is not None:
            self.span.end(error=None if status < 400 else str(status), **{
                "http.response.status_code": status, "gen_ai.usage.input_tokens": prompt_tokens,
                "gen_ai.usage.output_tokens": self.n_tokens})


def count_request(model: str, endpoint: str, status: int | str) -> None:
    REQUESTS.labels(model, endpoint, str(status)).inc()
