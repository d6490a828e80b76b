"""`mmpipe serve MODEL`: the whole stack on one machine, each part its own supervised process.

Starts an embedded redis-server (unless --redis-url), then encoder, generator, ingest and gateway as
`python -m mmpipe.cli <stage> ...` on the given or free ports, waits until each is healthy, restarts a child
that dies (exponential backoff, same ports), and on Ctrl-C / SIGTERM stops the children (gateway first,
encoder last, each given --shutdown-grace-s) and then Redis.

Each child gets OMP_NUM_THREADS=1 unless the environment sets it (as vLLM does for its workers): the stages'
CPU work is small tensors, and six processes each with one OpenMP thread per core oversubscribed the H200
box's 16 cores (served unique-image throughput 37.9 -> 50.9 req/s and 80%-repeated 67.5 -> 103 req/s at
concurrency 64 from this alone; BENCHMARKS.md). On the CPU the encoder and the generator keep torch's
default, since they run the models there.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from mmpipe.commands.serve_flags import add_stage_flags, child_args
from mmpipe.services.common.cli_args import add_log_format_arg, env, env_int


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="run redis + ingest + encoder + generator + gateway on this machine",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model directory or hub id")
    p.add_argument("--host", default=env("HOST", "127.0.0.1"), help="gateway bind address")
    p.add_argument("--port", type=int, default=env_int("PORT", 8000), help="gateway HTTP port")
    p.add_argument("--grpc-port", type=int, default=env_int("GRPC_PORT", 50050), help="gateway gRPC port")
    p.add_argument("--ingest-port", type=int, default=0, help="0 = a free port")
    p.add_argument("--encoder-port", type=int, default=0, help="0 = a free port")
    p.add_argument("--generator-port", type=int, default=0, help="0 = a free port")
    p.add_argument("--redis-url", default=env("REDIS_URL"),
                   help="use this Redis instead of starting an embedded redis-server")
    p.add_argument("--redis-maxmemory", default="1gb", help="maxmemory of the embedded redis-server")
    p.add_argument("--no-redis-auth", action="store_true",
                   help="start the embedded redis-server without a password (by default it gets a random one, "
                        "handed to the stages in MMPIPE_REDIS_PASSWORD, so no other local user can read the cache)")
    p.add_argument("--api-key", default=env("API_KEY"))
    p.add_argument("--shutdown-grace-s", type=float, default=10.0)
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--no-gateway", action="store_true", help="run only Redis and the three stages")
    p.add_argument("--stage-env", action="append", default=[], metavar="STAGE:KEY=VALUE",
                   help="an environment variable for one stage's process only (repeatable), e.g. "
                        "encoder:CUDA_VISIBLE_DEVICES=1 or generator:CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=60 "
                        "(stages: encoder, generator, ingest, gateway)")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"))
    add_log_format_arg(p)  # resolved here (serve's stderr is the children's) and given to every child
    p.add_argument("--otlp-traces-endpoint", default=env("OTLP_TRACES_ENDPOINT") or None,
                   help="OpenTelemetry spans of every stage and the gateway over OTLP/HTTP to this URL (vLLM's flag), "
                        "e.g. http://127.0.0.1:4318/v1/traces; passed to every child")
    from mmpipe.services.common.tls import add_client_tls_args, add_server_tls_args

    add_server_tls_args(p.add_argument_group("gRPC TLS of every stage and the gateway's gRPC API"))
    add_client_tls_args(p.add_argument_group("gRPC TLS of the stage clients and health checks"))
    add_stage_flags(p)  # every other flag of the stages, under its own name (serve_flags.py)
    return p


def start_embedded_redis(maxmemory: str, auth: bool = True):
    """The embedded redis-server of `mmpipe serve`: with a random password unless auth=False.

    Returns (server, url without password, password or None); the password reaches the stages in
    MMPIPE_REDIS_PASSWORD, never on a command line (argv is visible to every local user)."""
    import secrets

    from mmpipe.shared.cache.embedded_redis import EmbeddedRedis

    password = secrets.token_urlsafe(32) if auth else None
    srv = EmbeddedRedis(maxmemory=maxmemory, password=password).start()
    return srv, srv.url, password


@dataclass
class Child:
    name: str
    argv: list[str]
    health: tuple[str, str]  # ("grpc", "host:port") or ("http", url)
    proc: subprocess.Popen | None = None
    restarts: int = 0
    last_start: float = 0.0
    backoff_s: float = 1.0
    env: dict[str, str] | None = None  # secrets (Redis password, API keys) go here, never into argv
    tls: object | None = None  # a ClientTLS for the gRPC health check

    def start(self) -> None:
        self.last_start = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, env=self.env)

    def stop(self, grace_s: float) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace_s + 5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _on_gpu(device: str) -> bool:
    """Whether the stages will run on an NVIDIA GPU, without importing torch into the supervisor."""
    if device.startswith("cuda"):
        return True
    if device != "auto" or os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return False


_STAGES = ("encoder", "generator", "ingest", "gateway")


def parse_stage_env(specs: list[str]) -> dict[str, dict[str, str]]:
    """`--stage-env STAGE:KEY=VALUE` values -> {stage: {KEY: VALUE}}; ValueError naming a malformed one."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        stage, _, assign = spec.partition(":")
        key, eq, value = assign.partition("=")
        if stage not in _STAGES or not eq or not key or not key.replace("_", "").isalnum():
            raise ValueError(f"--stage-env {spec!r}: expected STAGE:KEY=VALUE with STAGE one of "
                             f"{', '.join(_STAGES)}")
        out.setdefault(stage, {})[key] = value
    return out


def _child_env(base: dict[str, str], name: str, on_gpu: bool, own: dict[str, str] | None = None) -> dict[str, str]:
    """One child's environment: OMP_NUM_THREADS=1 unless set (see the module docstring), then its own
    `--stage-env` variables."""
    env = {**base, **(own or {})}
    if "OMP_NUM_THREADS" not in env and (on_gpu or name in ("gateway", "ingest")):
        env["OMP_NUM_THREADS"] = "1"
    return env


def _healthy(kind: str, target: str, tls=None) -> bool:
    if kind == "http":
        import urllib.request

        try:
            return urllib.request.urlopen(target, timeout=1).status == 200
        except OSError:
            return False
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        ch = (grpc.secure_channel(target, tls.credentials(), options=tls.channel_options()) if tls is not None
              else grpc.insecure_channel(target))
        with ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _wait_healthy(child: Child, timeout_s: float, stop: threading.Event) -> None:
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        if child.proc is not None and child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with status {child.proc.returncode} while starting")
        if _healthy(*child.health, tls=child.tls):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} did not become healthy within {timeout_s:.0f}s")
        time.sleep(0.2)


def child_argvs(args: argparse.Namespace, ports: dict[str, int], redis_url: str) -> dict[str, list[str]]:
    """Each child's command line: the wiring serve owns (model, ports, addresses, Redis, logs, TLS, tracing),
    then every stage flag the user gave serve that this child takes (serve_flags.child_args)."""
    from mmpipe.shared.cache.embedded_redis import free_port

    from mmpipe.services.common.logs import resolve_format
    from mmpipe.services.common.tls import client_tls_from_args, server_tls_from_args

    try:
        stage_env = parse_stage_env(getattr(args, "stage_env", None) or [])
    except ValueError as e:
        print(f"mmpipe serve: error: {e}", file=sys.stderr)
        return 2
    server_tls, client_tls = server_tls_from_args(args), client_tls_from_args(args)
    tls_server_args = server_tls.args() if server_tls is not None else []
    tls_client_args = client_tls.args() if client_tls is not None else []
    addr = {n: f"127.0.0.1:{p}" for n, p in ports.items()}
    py = [sys.executable, "-m", "mmpipe.cli"]
    log_args = ["--log-format", resolve_format(args.log_format)]
    trace_args = ["--otlp-traces-endpoint", args.otlp_traces_endpoint] if args.otlp_traces_endpoint else []

    def stage(name: str, *wiring: str) -> list[str]:
        return [*py, name, "--model", args.model, "--host", "127.0.0.1", "--port", str(ports[name]),
                "--metrics-port", str(free_port()), "--log-level", args.log_level, *log_args,
                "--shutdown-grace-s", str(args.shutdown_grace_s), *tls_server_args, *trace_args, *wiring,
                *child_args(args, name)]

    out = {"encoder": stage("encoder", "--redis-url", redis_url),
           "generator": stage("generator", "--redis-url", redis_url),
           "ingest": stage("ingest", "--encoder-addr", addr["encoder"], *tls_client_args)}
    if not args.no_gateway:
        out["gateway"] = [
            *py, "gateway", "--model", args.model, "--host", args.host, "--port", str(args.port),
            "--grpc-port", str(args.grpc_port), "--ingest-addr", addr["ingest"], "--encoder-addr", addr["encoder"],
            "--generator-addr", addr["generator"], "--redis-url", redis_url, "--log-level", args.log_level.lower(), *log_args,
            "--shutdown-grace-s", str(args.shutdown_grace_s), *tls_server_args, *tls_client_args, *trace_args,
            *child_args(args, "gateway")]
    return out


def run(args: argparse.Namespace) -> int:
    from mmpipe.shared.cache.embedded_redis import free_port

    from mmpipe.services.common.tls import client_tls_from_args, server_tls_from_args

    from mmpipe.shared.errors import InvalidInputError, ServiceUnavailableError
    from mmpipe.shared.tools.plan import ToolSettings

    try:  # before anything starts: a gateway refusing its flags would only be restarted over and over
        # the gateway's own flags (serve_flags copies them; absent when not given)
        ToolSettings(getattr(args, "enable_auto_tool_choice", False), getattr(args, "tool_call_parser", None))
    except InvalidInputError as e:
        print(f"mmpipe serve: error: {e.message}", file=sys.stderr)
        return 2
    try:
        stage_env = parse_stage_env(getattr(args, "stage_env", None) or [])
    except ValueError as e:
        print(f"mmpipe serve: error: {e}", file=sys.stderr)
        return 2
    server_tls, client_tls = server_tls_from_args(args), client_tls_from_args(args)
    if server_tls is not None and client_tls is None:
        print("mmpipe serve: with --tls-cert-file, also give --stage-tls-ca-file (and --stage-tls-cert-file / "
              "--stage-tls-key-file with --tls-ca-file) so the stages and health checks can connect", file=sys.stderr)
        return 2
    child_env = dict(os.environ)
    redis = None
    redis_url = args.redis_url
    if not redis_url:
        try:
            redis, redis_url, password = start_embedded_redis(args.redis_maxmemory, auth=not args.no_redis_auth)
        except ServiceUnavailableError as e:  # no redis-server binary (mmpipe[embedded-redis] not installed)
            print(f"mmpipe serve: error: {e.message}", file=sys.stderr)
            return 2
        if password is not None:
            child_env["MMPIPE_REDIS_PASSWORD"] = password
        print(f"mmpipe serve: embedded redis-server at {redis_url}"
              f"{' (AUTH required; password in MMPIPE_REDIS_PASSWORD of the stages)' if password else ''}", flush=True)
    ports = {n: getattr(args, f"{n}_port") or free_port() for n in ("encoder", "generator", "ingest")}
    addr = {n: f"127.0.0.1:{p}" for n, p in ports.items()}
    argv = child_argvs(args, ports, redis_url)
    # the stages' --device when given to serve, else their own default (MMPIPE_DEVICE, auto)
    on_gpu = _on_gpu(getattr(args, "device", None) or os.environ.get("MMPIPE_DEVICE") or "auto")
    children = [Child(n, argv[n], ("grpc", addr[n]), env=_child_env(child_env, n, on_gpu, stage_env.get(n)),
                      tls=client_tls) for n in ("encoder", "generator", "ingest")]
    if "gateway" in argv:
        http_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        gw_env = {**_child_env(child_env, "gateway", on_gpu, stage_env.get("gateway")),
                  **({"MMPIPE_API_KEY": args.api_key} if args.api_key else {})}
        children.append(Child("gateway", argv["gateway"], ("http", f"http://{http_host}:{args.port}/health"),
                              env=gw_env))

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    status = 0
    try:
        for c in children[:3]:
            c.start()
        for c in children[:3]:
            _wait_healthy(c, args.startup_timeout_s, stop)
        if len(children) > 3:
            children[3].start()
            _wait_healthy(children[3], args.startup_timeout_s, stop)
        if not stop.is_set():
            where = (f"gateway listening on http://{args.host}:{args.port}/v1 (gRPC {args.host}:{args.grpc_port})"
                     if not args.no_gateway else "no gateway")
            print(f"mmpipe serve: ready; {where}; ingest {addr['ingest']}, encoder {addr['encoder']}, generator "
                  f"{addr['generator']}. Ctrl-C stops everything.", flush=True)
        while not stop.wait(0.5):
            for c in children:
                if c.proc is not None and c.proc.poll() is not None:
                    if time.monotonic() - c.last_start > 60:
                        c.backoff_s = 1.0  # it ran for a while: start the backoff over
                    print(f"mmpipe serve: {c.name} exited with status {c.proc.returncode}; restarting in "
                          f"{c.backoff_s:.0f}s", flush=True)
                    if stop.wait(c.backoff_s):
                        break
                    c.backoff_s = min(c.backoff_s * 2, 30.0)
                    c.restarts += 1
                    c.start()
    except RuntimeError as e:
        print(f"mmpipe serve: {e}", file=sys.stderr, flush=True)
        status = 1
    finally:
        print("mmpipe serve: stopping", flush=True)
        for c in reversed(children):  # gateway first, encoder last: callers go before the callees
            c.stop(args.shutdown_grace_s)
        if redis is not None:
            redis.stop()
    return status
