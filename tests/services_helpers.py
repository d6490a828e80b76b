"""Start the real stage services (ingest, encoder, generator) as processes on free 127.0.0.1 ports.

Shared by the service tests and the gateway tests:

    stack = start_stage_services(model_dir, redis_url)     # polls gRPC health until SERVING
    stack.ingest_addr, stack.encoder_addr, stack.generator_addr, stack.metrics_url("encoder")
    stack.stop()

`start_stage_process` starts one of them (e.g. to restart a killed encoder on the same port);
`start_gateway_process` a gateway in front of them; `served_stack` all four at once (a context manager), and
`stop_together` stops stacks, stages and gateways side by side.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from mmpipe.shared.cache.embedded_redis import free_port

STAGES = ("encoder", "generator", "ingest")


def wait_healthy(addr: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None,
                 log_path: Path | None = None) -> None:
    """Poll grpc.health.v1 Check("") on `addr` until SERVING (raises with the log tail on failure)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                break
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    tail = log_path.read_text(errors="replace")[-3000:] if log_path and log_path.exists() else ""
    raise RuntimeError(f"service at {addr} did not become healthy within {timeout_s}s; log tail:\n{tail}")


@dataclass
class StageProcess:
    name: str
    port: int
    metrics_port: int
    proc: subprocess.Popen
    log_path: Path
    argv: list[str]

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def start_stage_process(name: str, model_dir: str | Path, redis_url: str, *, port: int | None = None,
                        metrics_port: int | None = None, encoder_addr: str | None = None,
                        extra: list[str] | None = None, log_dir: Path | None = None, wait: bool = True,
                        timeout_s: float = 90.0) -> StageProcess:
    port = port or free_port()
    metrics_port = metrics_port or free_port()
    argv = [sys.executable, "-m", "mmpipe.cli", name, "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", str(metrics_port), "--device", "cpu",
            "--shutdown-grace-s", "5"]
    if name == "ingest":
        argv += ["--encoder-addr", encoder_addr or ""]
    else:
        argv += ["--redis-url", redis_url]
    argv += list(extra or [])
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="mmpipe-svc-"))
    log_path = log_dir / f"{name}-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    sp = StageProcess(name, port, metrics_port, proc, log_path, argv)
    if wait:
        try:
            wait_healthy(sp.addr, timeout_s, proc, log_path)
        except BaseException:
            sp.kill()
            raise
    return sp


@dataclass
class StageStack:
    """The three stage processes of one test session."""

    model_dir: str
    redis_url: str
    procs: dict[str, StageProcess] = field(default_factory=dict)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mmpipe-stack-")))

    @property
    def ingest_addr(self) -> str:
        return self.procs["ingest"].addr

    @property
    def encoder_addr(self) -> str:
        return self.procs["encoder"].addr

    @property
    def generator_addr(self) -> str:
        return self.procs["generator"].addr

    def metrics_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.procs[name].metrics_port}/metrics"

    def metric(self, name: str, metric: str, **labels: str) -> float:
        """Sum of the samples of `metric` (full sample name) on `name`'s /metrics matching `labels`."""
        return scrape(self.metrics_url(name), metric, **labels)

    def restart(self, name: str, *, wait: bool = True) -> StageProcess:
        """Start `name` again on the same ports (after a crash or kill)."""
        old = self.procs[name]
        old.stop()
        extra = _extra_of(old.argv)
        self.procs[name] = start_stage_process(name, self.model_dir, self.redis_url, port=old.port,
                                               metrics_port=old.metrics_port,
                                               encoder_addr=self.procs["encoder"].addr, extra=extra,
                                               log_dir=self.log_dir, wait=wait)
        return self.procs[name]

    def stop(self) -> None:
        """SIGTERM to every stage at once, so that they shut down side by side, then wait for each."""
        stop_together(self)


def stop_together(*parts: StageStack | StageProcess | GatewayProcess | None) -> None:
    """SIGTERM to every process of `parts` (stacks, stage processes, gateways; None skipped) at once, so that they
    shut down side by side, then wait for each (SIGKILL after 15 s)."""
    procs: list[subprocess.Popen] = []
    for part in parts:
        if isinstance(part, StageStack):
            procs += [part.procs[n].proc for n in ("ingest", "generator", "encoder") if n in part.procs]
        elif part is not None:
            procs.append(part.proc)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _extra_of(argv: list[str]) -> list[str]:
    i = argv.index("5")  # after "--shutdown-grace-s 5"
    rest = argv[i + 1:]
    if rest[:1] in (["--encoder-addr"], ["--redis-url"]):
        rest = rest[2:]
    return rest


def start_stage_services(model_dir: str | Path, redis_url: str, *, encoder_args: list[str] | None = None,
                         generator_args: list[str] | None = None, ingest_args: list[str] | None = None,
                         timeout_s: float = 120.0) -> StageStack:
    """Launch encoder, generator and ingest (in parallel) and wait until all report SERVING."""
    stack = StageStack(str(model_dir), redis_url)
    try:
        enc = start_stage_process("encoder", model_dir, redis_url, extra=encoder_args, log_dir=stack.log_dir,
                                  wait=False)
        gen = start_stage_process("generator", model_dir, redis_url, extra=generator_args, log_dir=stack.log_dir,
                                  wait=False)
        ing = start_stage_process("ingest", model_dir, redis_url, encoder_addr=enc.addr, extra=ingest_args,
                                  log_dir=stack.log_dir, wait=False)
        stack.procs = {"encoder": enc, "generator": gen, "ingest": ing}
        for p in (enc, gen, ing):
            wait_healthy(p.addr, timeout_s, p.proc, p.log_path)
    except BaseException:
        stack.stop()
        raise
    return stack


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def scrape(url: str, metric: str, **labels: str) -> float:
    """Sum of the Prometheus samples named `metric` whose labels include `labels` (0.0 when none)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != metric:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


# --- the gateway as a real process ------------------------------------------------------------------------------
@dataclass
class GatewayProcess:
    port: int
    grpc_port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_addr(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        """Poll GET /health (bounded); a gateway that exits or never gets healthy raises with its log tail."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gateway not healthy; log tail:\n{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_gateway_process(model: str, addrs: dict[str, str], log_dir: Path, extra_args: list[str],
                          env: dict[str, str] | None = None) -> GatewayProcess:
    """`mmpipe gateway` on free 127.0.0.1 ports in front of the given stage addresses."""
    port, gport = free_port(), free_port()
    log = Path(log_dir) / f"gateway-{port}.log"
    argv = [sys.executable, "-m", "mmpipe.cli", "gateway", "--model", str(model), "--served-model-name", "tiny",
            "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(gport),
            "--ingest-addr", addrs["ingest"], "--encoder-addr", addrs["encoder"],
            "--generator-addr", addrs["generator"], *extra_args]
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env)
    return GatewayProcess(port, gport, proc, log)


@contextmanager
def served_stack(model: str, redis_url: str, gateway_args: list[str], *, encoder_args: list[str] | None = None,
                 generator_args: list[str] | None = None, ingest_args: list[str] | None = None,
                 timeout_s: float = 300.0) -> Iterator[tuple[StageStack, GatewayProcess]]:
    """The three stages and a gateway in front of them (`gateway_args` after the stage addresses), all started at
    once: start-up is dominated by imports, which overlap on two cores better than they add up. Yields when all
    four are healthy (`timeout_s` is a bound, not an expectation); stops them side by side."""
    stack = StageStack(model, redis_url)
    gw = None
    try:
        enc = start_stage_process("encoder", model, redis_url, extra=encoder_args, log_dir=stack.log_dir, wait=False)
        gen = start_stage_process("generator", model, redis_url, extra=generator_args, log_dir=stack.log_dir,
                                  wait=False)
        ing = start_stage_process("ingest", model, redis_url, encoder_addr=enc.addr, extra=ingest_args,
                                  log_dir=stack.log_dir, wait=False)
        stack.procs = {"encoder": enc, "generator": gen, "ingest": ing}
        gw = start_gateway_process(model, {s: p.addr for s, p in stack.procs.items()}, stack.log_dir, gateway_args)
        for p in stack.procs.values():
            wait_healthy(p.addr, timeout_s, p.proc, p.log_path)
        gw.wait_healthy(timeout_s)
        yield stack, gw
    finally:
        stop_together(gw, stack)
