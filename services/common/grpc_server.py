"""The gRPC server plumbing every stage service shares.

  * `server_options` / `channel_options`: message-size limits (256 MiB default, FACTS: the 4 MB default
    fails on real tensors), keepalive, reconnect backoff, round_robin for dns:/// targets, and the pair that
    makes replicas added by an autoscaler get traffic: servers close every connection after
    --grpc-max-connection-age-ms (GOAWAY; in-flight RPCs get --grpc-max-connection-age-grace-ms to finish),
    and a client whose connection went away re-resolves its dns:/// name and balances over what it finds
    (gRPC re-resolves DNS only when a connection drops; without a maximum age a running gateway never
    sees new pods behind a headless Service).
  * `StageInterceptor`: maps `MMPipeError` to its gRPC code with its message (never INTERNAL for bad
    input; the error class travels in trailing metadata so clients rebuild the same exception), counts
    requests / latency per RPC, sets the request id (metadata `x-request-id`) for the JSON logs, opens the
    RPC's SERVER span under the caller's `traceparent` when tracing is on (services/common/tracing.py), and
    answers UNAVAILABLE until the service is ready.
  * `serve(...)`: health (SERVING only after `load` has run, which loads the model and does a tiny
    forward), reflection, Prometheus on --metrics-port, spans to --otlp-traces-endpoint, SIGTERM/SIGINT ->
    NOT_SERVING, stop accepting, finish in-flight RPCs within the grace period, flush the spans.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mmpipe.services.common import tracing
from mmpipe.services.common.cli_args import ServerConfig
from mmpipe.services.common.logs import REQUEST_ID, REQUEST_ID_HEADER
from mmpipe.services.common.metrics import ServiceMetrics
from mmpipe.shared.errors import MAX_WIRE_PARAM_CHARS, MMPipeError, ServiceUnavailableError, wire_text

log = logging.getLogger(__name__)

MiB = 1 << 20
ERROR_CLASS_HEADER = "mmpipe-error-class"
ERROR_PARAM_HEADER = "mmpipe-error-param"
RETRY_AFTER_HEADER = "retry-after"
RETRY_AFTER_S = 1


# How soon a client may re-resolve a dns:/// name after the previous resolution (gRPC's default is 30 s).
# A connection closed by --grpc-max-connection-age-ms asks for a new resolution; this bounds how often.
DNS_MIN_RERESOLVE_MS = 10_000


def server_options(max_message_mb: int = 256, *, max_connection_age_ms: int = 0,
                   max_connection_age_grace_ms: int = 0) -> list[tuple[str, Any]]:
    """max_connection_age_ms > 0: GOAWAY each connection after that long (gRPC adds +-10% jitter, so replicas
    don't reconnect in lockstep); max_connection_age_grace_ms > 0: then cut RPCs still running after that."""
    n = max_message_mb * MiB
    return connection_age_options(max_connection_age_ms, max_connection_age_grace_ms) + [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n),
            # accept the clients' keepalive pings (channel_options) instead of answering GOAWAY
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.so_reuseport", 0)]


def connection_age_options(max_connection_age_ms: int, max_connection_age_grace_ms: int) -> list[tuple[str, Any]]:
    """The server options of --grpc-max-connection-age-ms / -grace-ms (0: leave gRPC's default, no limit)."""
    age: list[tuple[str, Any]] = []
    if max_connection_age_ms > 0:
        age.append(("grpc.max_connection_age_ms", max_connection_age_ms))
        if max_connection_age_grace_ms > 0:
            age.append(("grpc.max_connection_age_grace_ms", max_connection_age_grace_ms))
    return age


def channel_options(target: str, max_message_mb: int = 256, *,
                    min_reresolve_ms: int = DNS_MIN_RERESOLVE_MS) -> list[tuple[str, Any]]:
    n = max_message_mb * MiB
    opts: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n),
        ("grpc.keepalive_time_ms", 20000), ("grpc.keepalive_timeout_ms", 10000),
        ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
        # A restarted stage must be found again within a second or two, not after grpc's 2-minute backoff.
        ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if target.startswith("dns:"):  # dns:///name:port, or dns://RESOLVER/name:port
        # Spread calls over every replica behind a headless service name, and look the name up again
        # (at most every min_reresolve_ms) when a server closes a connection for its age.
        opts += [("grpc.lb_policy_name", "round_robin"), ("grpc.dns_min_time_between_resolutions_ms",
                                                           min_reresolve_ms)]
    return opts


def _metadata_value(metadata: Any, name: str) -> str | None:
    for item in metadata or ():
        k, v = (item.key, item.value) if hasattr(item, "key") else item
        if k == name:
            return v.decode() if isinstance(v, bytes) else v
    return None


class StageInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics
        self.ready = False

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc."):
            return handler  # health and reflection: no metrics, no readiness gate
        method = details.method.rsplit("/", 1)[-1]
        rid = _metadata_value(details.invocation_metadata, REQUEST_ID_HEADER)
        trace = _trace_headers(details) if tracing.enabled() else None
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                t0, token = self._enter(rid)
                span = tracing.start_server(details.method, *trace, request_id=rid) if trace else None
                code = "OK"
                try:
                    self._check_ready()
                    return await inner(request, context)
                except BaseException as e:
                    code = _code_name(e, context)
                    await self._fail(e, context, method)
                    raise
                finally:
                    _end_span(span, code)
                    self._exit(method, code, t0, token)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)
        if handler.unary_stream:
            inner_s = handler.unary_stream

            async def stream(request, context):
                t0, token = self._enter(rid)
                span = tracing.start_server(details.method, *trace, request_id=rid) if trace else None
                code = "OK"
                try:
                    self._check_ready()
                    async for item in inner_s(request, context):
                        yield item
                except BaseException as e:
                    code = _code_name(e, context)
                    await self._fail(e, context, method)
                    raise
                finally:
                    _end_span(span, code)
                    self._exit(method, code, t0, token)

            return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=handler.request_deserializer,
                                                        response_serializer=handler.response_serializer)
        return handler

    def _check_ready(self) -> None:
        if not self.ready:
            raise ServiceUnavailableError(f"the {self.metrics.service} service is starting (model not loaded yet)")

    def _enter(self, rid: str | None):
        self.metrics.in_flight.labels(self.metrics.model).inc()
        return time.perf_counter(), REQUEST_ID.set(rid)

    def _exit(self, method: str, code: str, t0: float, token) -> None:
        m = self.metrics
        m.in_flight.labels(m.model).dec()
        m.requests.labels(m.model, method, code).inc()
        m.latency.labels(m.model, method).observe(time.perf_counter() - t0)
        REQUEST_ID.reset(token)

    async def _fail(self, e: BaseException, context, method: str) -> None:
        """Turn `e` into a gRPC status by aborting (raises AbortError), unless it is already one."""
        if isinstance(e, (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit)):
            return
        if isinstance(e, MMPipeError):
            code, details, md = error_status(e)
            log.info("%s failed: %s %s", method, code.name, details)
            context.set_trailing_metadata(md)
            await _abort(context, code, details)
        log.exception("%s failed with an unexpected error", method)
        await _abort(context, grpc.StatusCode.INTERNAL, wire_text(f"internal error: {type(e).__name__}: {e}"))


def error_status(e: MMPipeError) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    """The one mapping of a domain error to a gRPC status: code, details and trailing metadata (error class,
    param, retry-after). Details and param may hold user text: escaped to ASCII and truncated (shared/errors
    `wire_text`), so a client error never turns into INTERNAL (non-ASCII metadata) or RESOURCE_EXHAUSTED
    (trailers over gRPC's metadata limit)."""
    code = getattr(grpc.StatusCode, e.grpc_code, grpc.StatusCode.INTERNAL)
    md = [(ERROR_CLASS_HEADER, type(e).__name__)]
    if e.grpc_code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
        md.append((RETRY_AFTER_HEADER, str(RETRY_AFTER_S)))  # retryable: say when, as HTTP does
    if e.param:
        md.append((ERROR_PARAM_HEADER, wire_text(e.param, MAX_WIRE_PARAM_CHARS)))
    return code, wire_text(e.message), md


def _trace_headers(details) -> tuple[str | None, str | None]:
    """The caller's W3C trace context, read beside x-request-id (written by stage_clients._metadata)."""
    md = details.invocation_metadata
    return (_metadata_value(md, tracing.TRACEPARENT_HEADER), _metadata_value(md, tracing.TRACESTATE_HEADER))


def _end_span(span: tracing.OpenSpan | None, code: str) -> None:
    if span is not None:
        status = getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)
        span.end(error=None if code == "OK" else code, **{"rpc.grpc.status_code": status.value[0]})


def _code_name(e: BaseException, context) -> str:
    if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    if isinstance(e, grpc.aio.AbortError):  # the handler aborted with its own status
        c = context.code()
        return c.name if c is not None else "UNKNOWN"
    if isinstance(e, MMPipeError):
        return e.grpc_code
    return "INTERNAL"


async def _abort(context, code: grpc.StatusCode, message: str) -> None:
    await context.abort(code, message)


async def serve(*, name: str, cfg: ServerConfig, metrics: ServiceMetrics,
                register: Callable[[grpc.aio.Server], list[str]],
                load: Callable[[], Awaitable[None]], close: Callable[[], Awaitable[None]] | None = None,
                alive: Callable[[], bool] | None = None, alive_period_s: float = 0.5) -> None:
    """Run one stage server until SIGTERM/SIGINT.

    register(server) adds the servicers and returns their full service names; load() loads the model and
    warms it up (health stays NOT_SERVING, RPCs get UNAVAILABLE, until it returns); close() runs after the
    server has stopped (flush caches, stop engines). alive(), checked every alive_period_s once ready, is the
    liveness of what serves (the generator's engine loop): when it turns False, health turns NOT_SERVING for
    good, so an orchestrator restarts the process.
    """
    tracing.setup(metrics.service, getattr(cfg, "otlp_traces_endpoint", None))
    interceptor = StageInterceptor(metrics)
    server = grpc.aio.server(interceptors=[interceptor],
                             options=server_options(cfg.max_message_mb,
                                                    max_connection_age_ms=cfg.max_connection_age_ms,
                                                    max_connection_age_grace_ms=cfg.max_connection_age_grace_ms),
                             maximum_concurrent_rpcs=getattr(cfg, "max_concurrent_rpcs", None) or None)
    names = register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for n in ["", *names]:
        await health_servicer.set(n, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    tls = getattr(cfg, "tls", None)
    if tls is not None:  # TLS, or mTLS with a CA file (services/common/tls.py)
        port = server.add_secure_port(f"{cfg.host}:{cfg.port}", tls.credentials())
    else:
        port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if port == 0:
        raise ServiceUnavailableError(f"{name}: could not bind {cfg.host}:{cfg.port}")
    await server.start()
    metrics.serve(cfg.host, cfg.metrics_port)
    log.info("%s listening on %s:%d (%s; metrics on :%s); loading", name, cfg.host, port,
             "plaintext" if tls is None else ("mTLS" if tls.mutual else "TLS"), cfg.metrics_port or "off")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    load_task = asyncio.create_task(load())
    stop_task = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if load_task in done:
        load_task.result()  # a failed load exits the process with its error
        interceptor.ready = True
        metrics.ready.labels(metrics.model).set(1)
        for n in ["", *names]:
            await health_servicer.set(n, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s ready on %s:%d", name, cfg.host, port)
        watch = None
        if alive is not None:
            watch = asyncio.create_task(_watch_liveness(name, alive, alive_period_s, health_servicer, names))
        await stop_task
        if watch is not None:
            watch.cancel()
    else:
        load_task.cancel()
    log.info("%s shutting down: finishing in-flight RPCs (grace %.0f s)", name, cfg.shutdown_grace_s)
    await health_servicer.enter_graceful_shutdown()
    metrics.ready.labels(metrics.model).set(0)
    await server.stop(cfg.shutdown_grace_s)
    if close is not None:
        await close()
    tracing.shutdown()  # the spans still queued go out before the process ends
    log.info("%s stopped", name)


async def _watch_liveness(name: str, alive: Callable[[], bool], period_s: float,
                          health_servicer: health.aio.HealthServicer, names: list[str]) -> None:
    while alive():
        await asyncio.sleep(period_s)
    log.error("%s: its engine is dead: health NOT_SERVING", name)
    for n in ["", *names]:
        await health_servicer.set(n, health_pb2.HealthCheckResponse.NOT_SERVING)
