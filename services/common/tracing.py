"""OpenTelemetry traces of a request across the stages, on when `--otlp-traces-endpoint URL` is given.

vLLM's flag, on every stage, the gateway and `mmpipe serve` (env MMPIPE_OTLP_TRACES_ENDPOINT). With it, each
process exports its spans over OTLP/HTTP protobuf to URL (`http://collector:4318/v1/traces`; a URL without a
path gets `/v1/traces`), batched by the SDK's BatchSpanProcessor (OTEL_BSP_SCHEDULE_DELAY and the other OTEL_BSP_*
variables apply) and flushed when the process stops (`shutdown`). Resource `service.name` is `mmpipe-<stage>`.

One trace per request: the gateway's request span (`start_request`), a child span per gateway step, and the
stages' SERVER spans (`start_server`, from the stage interceptor) as children of whatever span was current when
the call was made: W3C `traceparent` / `tracestate` travel in gRPC metadata beside `x-request-id`, written by
`inject` in the stage clients (services/common/stage_clients.py) and read in the interceptor
(services/common/grpc_server.py), the same two places as the request id. Step spans come from
services/common/steps.py, which times the same steps for the step histograms.

Without the flag nothing of OpenTelemetry is imported (neither the SDK nor the API) and every helper returns at
once on one `is None` test, so tracing costs nothing when it is off.
"""
from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"

# Set by `setup` with an endpoint; None means tracing is off.
_tracer: Any = None
_provider: Any = None
_propagator: Any = None


def enabled() -> bool:
    return _tracer is not None


def traces_endpoint(url: str | None) -> str | None:
    """The OTLP/HTTP traces URL of a flag value ('' / None: off); a bare host:port URL gets /v1/traces."""
    if not url or not url.strip():
        return None
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    if parts.path in ("", "/"):
        url = urllib.parse.urlunsplit(parts._replace(path="/v1/traces"))
    return url


def setup(service: str, endpoint: str | None) -> bool:
    """Export this process's spans to `endpoint` as `mmpipe-<service>`; no endpoint: off. True when on."""
    global _tracer, _provider, _propagator
    url = traces_endpoint(endpoint)
    if url is None:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if _provider is not None:
        _provider.shutdown()
    _provider = TracerProvider(resource=Resource.create({"service.name": f"mmpipe-{service}"}))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    # This module's own provider, not the API's global one: the stages use nothing else that traces.
    _tracer = _provider.get_tracer("mmpipe")
    _propagator = TraceContextTextMapPropagator()
    log.info("tracing: spans of %s go to %s (OTLP/HTTP)", service, url)
    return True


def shutdown() -> None:
    """Flush the spans still queued and stop exporting (a no-op when tracing is off)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.force_flush(10_000)
        _provider.shutdown()
    _tracer = _provider = None


# ---- propagation (gRPC metadata) -------------------------------------------------------------------------------
def inject(metadata: list[tuple[str, str]]) -> None:
    """Append the current span's `traceparent` (and `tracestate`) to outgoing gRPC metadata."""
    if _tracer is None:
        return
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    metadata.extend(carrier.items())


def _extract(traceparent: str | None, tracestate: str | None):
    carrier = {TRACEPARENT_HEADER: traceparent} if traceparent else {}
    if traceparent and tracestate:
        carrier[TRACESTATE_HEADER] = tracestate
    return _propagator.extract(carrier)


# ---- spans -----------------------------------------------------------------------------------------------------
class OpenSpan:
    """A span made current by `start_*`; `end` ends it and restores the previous context (same task)."""

    __slots__ = ("span", "_token")

    def __init__(self, span: Any, token: Any):
        self.span, self._token = span, token

    def detach(self) -> None:
        """Stop being the current span (the span itself goes on until `end`)."""
        if self._token is not None:
            from opentelemetry import context

            context.detach(self._token)
            self._token = None

    def end(self, *, error: str | None = None, **attributes: Any) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.detach()
        if attributes:
            self.span.set_attributes(attributes)
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()


def _start(name: str, kind_name: str, parent: Any, attributes: dict[str, Any]) -> OpenSpan:
    from opentelemetry import context, trace

    span = _tracer.start_span(name, context=parent, kind=getattr(trace.SpanKind, kind_name),
                              attributes={k: v for k, v in attributes.items() if v is not None})
    return OpenSpan(span, context.attach(trace.set_span_in_context(span)))


def start_request(name: str, request_id: str | None = None, **attributes: Any) -> OpenSpan | None:
    """The gateway's span of one request (a root: clients' trace headers are not taken), made current."""
    if _tracer is None:
        return None
    return _start(name, "SERVER", None, {"mmpipe.request_id": request_id, **attributes})


def start_server(full_method: str, traceparent: str | None, tracestate: str | None,
                 request_id: str | None = None) -> OpenSpan | None:
    """A stage's SERVER span of one RPC (`/mmpipe.v1.Ingest/Ingest`), child of the caller's span from its
    `traceparent` (a root without one), made current."""
    if _tracer is None:
        return None
    name = full_method.lstrip("/")
    service, _, method = name.rpartition("/")
    return _start(name, "SERVER", _extract(traceparent, tracestate),
                  {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
                   "mmpipe.request_id": request_id})


@contextmanager
def span(name: str) -> Iterator[None]:
    """A child span of the current one around a block (tracing on; callers check `enabled()` first)."""
    with _tracer.start_as_current_span(name):
        yield


def record(name: str, start: float, end: float, *, clock: Callable[[], float] = time.perf_counter,
           **attributes: Any) -> None:
    """A finished child span of the current one, for a step timed elsewhere: `start` / `end` are readings of
    `clock` (time.perf_counter here; time.monotonic for the engine core's timestamps)."""
    if _tracer is None:
        return
    offset_ns = time.time_ns() - int(clock() * 1e9)  # this clock's zero on the wall clock
    s = _tracer.start_span(name, start_time=offset_ns + int(start * 1e9),
                           attributes={k: v for k, v in attributes.items() if v is not None} or None)
    s.end(end_time=offset_ns + int(max(end, start) * 1e9))
