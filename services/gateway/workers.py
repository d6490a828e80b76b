"""`--api-server-count N` (vLLM's flag): N gateway processes serving one HTTP port and one gRPC port.

The parent binds the HTTP socket once (so a taken port fails once, at start, and no other process can join the
port the way SO_REUSEPORT would let it) and hands it to N worker processes (`multiprocessing` spawn), each a
whole gateway (`server.serve`) accepting connections on that socket in its own event loop; the kernel gives
each new connection to one of them. The public gRPC port is bound by every worker with SO_REUSEPORT, gRPC's
default on Linux. The parent only supervises: a worker that dies is started again (backoff, same socket);
SIGTERM / SIGINT go to every worker, which finish their in-flight requests within --shutdown-grace-s.

Metrics: Prometheus multiprocess mode. Every worker writes its counters and histograms to files under one
PROMETHEUS_MULTIPROC_DIR, so GET /metrics on the one port, whichever worker answers, reports the totals of all
workers: an operator scrapes one target, as with one process, and no scrape target has to know N (per-process
metrics ports would need N targets, and N in the scrape config). The process metrics (`process_cpu_seconds_total`
and the rest), which multiprocess mode cannot merge, are read from /proc for every live worker and carry a
`worker` label (the parent registers each worker's pid in that directory); a sum over `worker` is the
gateway's CPU.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from .config import GatewayConfig

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PID_FILE_SUFFIX = ".gateway-worker-pid"
_POLL_S = 0.5
_MAX_BACKOFF_S = 30.0


def bind_http_socket(host: str, port: int) -> socket.socket:
    """The listening HTTP socket, bound once by the parent (as uvicorn binds for its own --workers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio sets TCP_NODELAY only on sockets whose proto
    # is IPPROTO_TCP. With proto 0 every SSE response ran under Nagle: the first token's chunk, a second small
    # write, waited for the client's delayed ACK, ~40 ms on every request (BENCHMARKS.md, "TTFT: 40 ms of Nagle").
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind the HTTP port {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def register_worker_pid(mp_dir: str, index: int, pid: int) -> None:
    Path(mp_dir, f"{index}{PID_FILE_SUFFIX}").write_text(str(pid))


def worker_pids(mp_dir: str) -> dict[str, int]:
    """worker index -> pid, for the workers the parent registered."""
    out = {}
    for f in Path(mp_dir).glob(f"*{PID_FILE_SUFFIX}"):
        try:
            out[f.name[: -len(PID_FILE_SUFFIX)]] = int(f.read_text().strip())
        except (OSError, ValueError):
            continue
    return out


def _worker_main(cfg: GatewayConfig, sock: socket.socket, index: int) -> None:
    """One worker process: a whole gateway on the inherited HTTP socket."""
    import asyncio

    from mmpipe.services.common.logs import setup_logging

    from .server import serve

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent sends SIGTERM
    setup_logging("gateway", cfg.log_level, cfg.log_format)
    asyncio.run(serve(cfg, http_socket=sock, worker=index))


class _Worker:
    def __init__(self, index: int):
        self.index = index
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.started = 0.0
        self.backoff_s = 1.0
        self.restart_at: float | None = None


def run_workers(cfg: GatewayConfig) -> int:
    """Bind, start cfg.api_server_count workers, supervise them until SIGTERM / SIGINT; the exit status."""
    n = cfg.api_server_count
    sock = bind_http_socket(cfg.host, cfg.port)
    mp_dir = tempfile.mkdtemp(prefix="mmpipe-gateway-metrics-")
    os.environ[MULTIPROC_ENV] = mp_dir  # before any worker imports prometheus_client (spawn children inherit it)
    from prometheus_client import multiprocess  # after the variable is set: the parent is a multiprocess peer too

    ctx = multiprocessing.get_context("spawn")
    stop = {"now": False}

    def on_signal(*_: object) -> None:
        stop["now"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    workers = [_Worker(i) for i in range(n)]

    def start(w: _Worker) -> None:
        w.proc = ctx.Process(target=_worker_main, args=(cfg, sock, w.index), name=f"gateway-worker-{w.index}",
                             daemon=False)
        w.proc.start()
        w.started = time.monotonic()
        w.restart_at = None
        register_worker_pid(mp_dir, w.index, w.proc.pid)

    logger.info("gateway: %d API server processes on http://%s:%d (gRPC %s:%d), metrics merged in %s", n,
                cfg.host, cfg.port, cfg.host, cfg.grpc_port, mp_dir)
    status = 0
    try:
        for w in workers:
            start(w)
        while not stop["now"]:
            time.sleep(_POLL_S)
            now = time.monotonic()
            for w in workers:
                p = w.proc
                if w.restart_at is not None:
                    if now >= w.restart_at:
                        start(w)
                elif p is not None and not p.is_alive():
                    multiprocess.mark_process_dead(p.pid, mp_dir)  # its live gauges leave the totals
                    if now - w.started > 60:
                        w.backoff_s = 1.0  # it ran for a while: start the backoff over
                    logger.warning("gateway worker %d (pid %d) exited with status %s; restarting in %.0f s",
                                   w.index, p.pid, p.exitcode, w.backoff_s)
                    w.restart_at = now + w.backoff_s
                    w.backoff_s = min(w.backoff_s * 2, _MAX_BACKOFF_S)
    finally:
        for w in workers:
            if w.proc is not None and w.proc.is_alive():
                os.kill(w.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + cfg.shutdown_grace_s + 5
        for w in workers:
            if w.proc is None:
                continue
            w.proc.join(max(0.1, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(5)
            if w.proc.exitcode not in (0, -signal.SIGTERM):
                status = 1
        sock.close()
        shutil.rmtree(mp_dir, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)
    return status
