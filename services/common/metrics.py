"""Prometheus metrics shared by the stage services: per-RPC counters and latencies, served on --metrics-port.

Names follow `mmpipe_<service>_<what>_<unit>` with a `model` label; the service-specific metrics (batch
sizes, cache hits, bytes moved) are created by each service with `ServiceMetrics.counter/histogram/gauge`, and
its time per step of a request by `ServiceMetrics.steps()` (services/common/steps.py, one scheme for every stage).
Each service uses its own CollectorRegistry so that tests starting several services in one process work.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from mmpipe.services.common.steps import STEP_BUCKETS, STEP_DOC, StepTimer

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
BYTES_BUCKETS = tuple(float(1 << s) for s in range(10, 31, 2))


class ServiceMetrics:
    def __init__(self, service: str, model: str):
        self.service = service
        self.model = model
        self.registry = CollectorRegistry()
        p = f"mmpipe_{service}"
        self.requests = Counter(f"{p}_requests", "RPCs handled, by method and gRPC status code",
                                ["model", "method", "code"], registry=self.registry)
        self.latency = Histogram(f"{p}_request_duration_seconds", "RPC latency by method", ["model", "method"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge(f"{p}_requests_in_flight", "RPCs being served", ["model"], registry=self.registry)
        self.ready = Gauge(f"{p}_ready", "1 once the model is loaded and warmed up", ["model"],
                           registry=self.registry)
        self._steps: StepTimer | None = None

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(f"mmpipe_{self.service}_{name}", doc, ["model", *labels], registry=self.registry)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(f"mmpipe_{self.service}_{name}", doc, ["model", *labels], registry=self.registry)

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> Histogram:
        return Histogram(f"mmpipe_{self.service}_{name}", doc, ["model", *labels], buckets=buckets,
                         registry=self.registry)

    def steps(self) -> StepTimer:
        """This service's `mmpipe_<service>_step_duration_seconds{model, step}` (one per registry)."""
        if self._steps is None:
            h = self.histogram("step_duration_seconds", STEP_DOC, STEP_BUCKETS, ("step",))
            self._steps = StepTimer(h, self.model)
        return self._steps

    def serve(self, host: str, port: int):
        """Start the /metrics HTTP server in a daemon thread (port 0: no server). Returns (server, thread)."""
        if not port:
            return None
        return start_http_server(port, addr=host, registry=self.registry)
