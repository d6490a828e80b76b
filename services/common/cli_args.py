"""Command-line flags shared by the stage services, named as in `vllm serve`, with MMPIPE_* env defaults.

Each service adds its own flags and builds ONE config dataclass from the parsed namespace.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from mmpipe.services.common.tls import (ClientTLS, ServerTLS, add_client_tls_args, add_server_tls_args,
                                        client_tls_from_args, server_tls_from_args)
from mmpipe.shared.errors import InvalidInputError


@dataclass
class ServerConfig:
    """What every stage server takes from the shared server flags."""

    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    max_message_mb: int = 256
    # RPCs in progress at once (health checks included); beyond it gRPC answers RESOURCE_EXHAUSTED at once.
    max_concurrent_rpcs: int = 1024
    shutdown_grace_s: float = 30.0
    # GOAWAY every client connection after this long, so clients re-resolve and find new replicas (0: never)
    max_connection_age_ms: int = 300_000  # MAX_CONNECTION_AGE_MS
    # ... and then give its in-flight RPCs this long before cutting them (a long generation stream included)
    max_connection_age_grace_ms: int = 600_000  # MAX_CONNECTION_AGE_GRACE_MS
    log_level: str = "INFO"
    log_format: str | None = None  # --log-format text / json; None: text on a terminal, else JSON (common/logs.py)
    tls: ServerTLS | None = None  # --tls-cert-file / --tls-key-file / --tls-ca-file (services/common/tls.py)
    otlp_traces_endpoint: str | None = None  # --otlp-traces-endpoint: spans over OTLP/HTTP (services/common/tracing.py)


class EnvValueError(ValueError):
    """A MMPIPE_* variable whose value does not parse, raised only when its value is used (`check_env_defaults`)."""


@dataclass(frozen=True)
class BadEnv:
    """The env default of a flag whose MMPIPE_* value does not parse as the flag's type.

    Parsers are built for every subcommand at once (and `--help` prints the defaults), so a bad value must not
    fail there: it stays this marker, and `check_env_defaults` turns it into a one-line error only if the flag
    was left at its default, i.e. only when the value is used. A flag given on the command line wins."""

    name: str  # the full variable name, MMPIPE_...
    raw: str
    kind: str  # "an integer", "a number"

    def __str__(self) -> str:  # what --help shows for %(default)s
        return self.raw

    def error(self) -> EnvValueError:
        return EnvValueError(f"{self.name}={self.raw!r} is not {self.kind}")


def env(name: str, default: Any = None) -> Any:
    """The MMPIPE_<name> variable (a string) or `default`: the one place the MMPIPE_* flag defaults are read."""
    return os.environ.get(f"MMPIPE_{name}", default)


def _typed_env(name: str, default: Any, parse: Callable[[str], Any], kind: str) -> Any:
    v = env(name)
    if v is None or not v.strip():
        return default
    try:
        return parse(v)
    except ValueError:
        return BadEnv(f"MMPIPE_{name}", v, kind)


def env_int(name: str, default: Any) -> Any:
    """MMPIPE_<name> as an int, `default` when unset or empty, a `BadEnv` when it is not an integer."""
    return _typed_env(name, default, int, "an integer")


def env_float(name: str, default: Any) -> Any:
    """MMPIPE_<name> as a float, `default` (an int becomes a float) when unset or empty, a `BadEnv` when it is
    not a number."""
    if isinstance(default, int) and not isinstance(default, bool):
        default = float(default)
    return _typed_env(name, default, float, "a number")


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> Any:
    """MMPIPE_<name> lower-cased when it is one of `choices`, `default` when unset or empty, a `BadEnv` otherwise
    (give the flag `choices=` too: argparse checks a value given on the command line, never a default)."""
    return _typed_env(name, default, lambda v: _one_of(v, choices), "one of " + ", ".join(choices))


def _one_of(v: str, choices: tuple[str, ...]) -> str:
    if v.strip().lower() not in choices:
        raise ValueError(v)
    return v.strip().lower()


def env_bool(name: str, default: bool = False) -> bool:
    v = env(name)
    return default if v in (None, "") else v.strip().lower() in ("1", "true", "yes", "on")


def check_env_defaults(args: argparse.Namespace) -> None:
    """Raise EnvValueError naming the first MMPIPE_* variable whose bad value a parsed flag still holds."""
    for value in vars(args).values():
        if isinstance(value, BadEnv):
            raise value.error()


def add_server_args(p: argparse.ArgumentParser, *, default_port: int) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--model", default=env("MODEL"), required=env("MODEL") is None,
                   help="model directory or hub id (env MMPIPE_MODEL); every stage must use the same name")
    g.add_argument("--host", default=env("HOST", "127.0.0.1"), help="address to bind (env MMPIPE_HOST)")
    g.add_argument("--port", type=int, default=env_int("PORT", default_port),
                   help="gRPC port, 0 = pick a free one (env MMPIPE_PORT; default %(default)s)")
    g.add_argument("--metrics-port", type=int, default=env_int("METRICS_PORT", 0),
                   help="Prometheus /metrics HTTP port, 0 = off (env MMPIPE_METRICS_PORT)")
    g.add_argument("--max-message-mb", type=int, default=env_int("MAX_MESSAGE_MB", 256),
                   help="max gRPC message size in MiB, sent and received (env MMPIPE_MAX_MESSAGE_MB)")
    g.add_argument("--max-concurrent-rpcs", type=int, default=env_int("MAX_CONCURRENT_RPCS", 1024),
                   help="RPCs served at once; more get RESOURCE_EXHAUSTED at once, so memory stays bounded "
                        "(env MMPIPE_MAX_CONCURRENT_RPCS)")
    g.add_argument("--shutdown-grace-s", type=float, default=env_float("SHUTDOWN_GRACE_S", 30.0),
                   help="on SIGTERM, seconds in-flight RPCs get to finish (env MMPIPE_SHUTDOWN_GRACE_S)")
    g.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="env MMPIPE_LOG_LEVEL")
    add_log_format_arg(g)
    add_connection_age_args(g)
    add_tracing_arg(g)
    add_server_tls_args(p.add_argument_group("grpc tls (server)"))


def add_log_format_arg(g) -> None:
    """--log-format, on every command that starts a service (the stages, the gateway, `mmpipe serve`)."""
    from mmpipe.services.common.logs import LOG_FORMATS  # stdlib only

    g.add_argument("--log-format", choices=LOG_FORMATS, type=str.lower,
                   default=env_choice("LOG_FORMAT", None, LOG_FORMATS),
                   help="text: one short line per event; json: one JSON object per line (ts, level, logger, stage, "
                        "msg, request_id, fields); default: text when stderr is a terminal, else json "
                        "(env MMPIPE_LOG_FORMAT)")


MAX_CONNECTION_AGE_MS = 300_000
MAX_CONNECTION_AGE_GRACE_MS = 600_000


def add_connection_age_args(g) -> None:
    """--grpc-max-connection-age-ms / -grace-ms, on every gRPC server (the stages and the gateway's API)."""
    g.add_argument("--grpc-max-connection-age-ms", type=int,
                   default=env_int("GRPC_MAX_CONNECTION_AGE_MS", MAX_CONNECTION_AGE_MS),
                   help="close each client connection (GOAWAY) after this many ms, so clients re-resolve DNS and "
                        "spread over replicas added since; 0 = never (env MMPIPE_GRPC_MAX_CONNECTION_AGE_MS; "
                        "default %(default)s)")
    g.add_argument("--grpc-max-connection-age-grace-ms", type=int,
                   default=env_int("GRPC_MAX_CONNECTION_AGE_GRACE_MS", MAX_CONNECTION_AGE_GRACE_MS),
                   help="after that GOAWAY, ms the connection's in-flight RPCs (a long generation stream) get "
                        "before they are cut; 0 = no limit (env MMPIPE_GRPC_MAX_CONNECTION_AGE_GRACE_MS; "
                        "default %(default)s)")


def connection_age(a: argparse.Namespace) -> tuple[int, int]:
    """(max_connection_age_ms, max_connection_age_grace_ms) of the parsed flags, checked >= 0."""
    return (_non_negative(a, "grpc_max_connection_age_ms", MAX_CONNECTION_AGE_MS),
            _non_negative(a, "grpc_max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS))


def add_tracing_arg(g) -> None:
    """--otlp-traces-endpoint (vLLM's flag), on every stage, the gateway and `mmpipe serve`."""
    g.add_argument("--otlp-traces-endpoint", default=env("OTLP_TRACES_ENDPOINT") or None,
                   help="send OpenTelemetry spans of every request over OTLP/HTTP to this URL, e.g. "
                        "http://collector:4318/v1/traces (W3C traceparent links the stages); default: no tracing "
                        "(env MMPIPE_OTLP_TRACES_ENDPOINT)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--dtype", default=env("DTYPE", "auto"), help="auto, float32, bfloat16, float16 (env MMPIPE_DTYPE)")
    g.add_argument("--device", default=env("DEVICE", "auto"), help="auto, cpu, cuda, cuda:N (env MMPIPE_DEVICE)")
    g.add_argument("--media-io-kwargs", default=env("MEDIA_IO_KWARGS"),
                   help='JSON keyed by modality, e.g. \'{"video": {"num_frames": 8}}\' (env MMPIPE_MEDIA_IO_KWARGS)')
    g.add_argument("--mm-processor-kwargs", default=env("MM_PROCESSOR_KWARGS"),
                   help="JSON keywords for the HF processor (env MMPIPE_MM_PROCESSOR_KWARGS)")
    g.add_argument("--trust-remote-code", action="store_true", default=env_bool("TRUST_REMOTE_CODE"))


def add_redis_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=env("REDIS_URL"), required=env("REDIS_URL") is None,
                   help="the shared embedding cache, redis://host:port/db, or a Redis / Valkey cluster: "
                        "redis+cluster://host:port[,host:port] (env MMPIPE_REDIS_URL)")
    add_redis_security_args(p)


def add_redis_security_args(p: argparse.ArgumentParser) -> None:
    """AUTH password (file or MMPIPE_REDIS_PASSWORD, never a flag: argv is visible in `ps`) and TLS files."""
    g = p.add_argument_group("redis auth and tls")
    g.add_argument("--redis-password-file", default=env("REDIS_PASSWORD_FILE"),
                   help="file whose first line is the Redis password (env MMPIPE_REDIS_PASSWORD_FILE; or set "
                        "MMPIPE_REDIS_PASSWORD; a password in the URL wins)")
    g.add_argument("--redis-tls-ca-file", default=env("REDIS_TLS_CA_FILE"),
                   help="CA that verifies the Redis server, for rediss:// URLs (env MMPIPE_REDIS_TLS_CA_FILE)")
    g.add_argument("--redis-tls-cert-file", default=env("REDIS_TLS_CERT_FILE"),
                   help="client certificate for Redis TLS (env MMPIPE_REDIS_TLS_CERT_FILE)")
    g.add_argument("--redis-tls-key-file", default=env("REDIS_TLS_KEY_FILE"),
                   help="its private key (env MMPIPE_REDIS_TLS_KEY_FILE)")


def redis_options(a: argparse.Namespace):
    """The RedisOptions of the parsed redis flags (reads the password file / MMPIPE_REDIS_PASSWORD)."""
    from mmpipe.shared.cache.redis_options import RedisOptions

    return RedisOptions.load(password_file=getattr(a, "redis_password_file", None),
                             tls_ca_file=getattr(a, "redis_tls_ca_file", None),
                             tls_cert_file=getattr(a, "redis_tls_cert_file", None),
                             tls_key_file=getattr(a, "redis_tls_key_file", None))


def add_stage_client_args(p: argparse.ArgumentParser) -> None:
    """--stage-tls-*: how this service's channels to other stages use TLS / mTLS."""
    add_client_tls_args(p.add_argument_group("grpc tls (client, to other stages)"))


def stage_client_tls(a: argparse.Namespace) -> ClientTLS | None:
    return client_tls_from_args(a)


def server_config(a: argparse.Namespace) -> ServerConfig:
    return ServerConfig(host=a.host, port=a.port, metrics_port=a.metrics_port, max_message_mb=a.max_message_mb,
                        max_concurrent_rpcs=getattr(a, "max_concurrent_rpcs", 1024),
                        shutdown_grace_s=a.shutdown_grace_s, log_level=a.log_level,
                        log_format=getattr(a, "log_format", None),
                        max_connection_age_ms=connection_age(a)[0], max_connection_age_grace_ms=connection_age(a)[1], tls=server_tls_from_args(a),
                        otlp_traces_endpoint=getattr(a, "otlp_traces_endpoint", None))


def _non_negative(a: argparse.Namespace, dest: str, default: int) -> int:
    v = getattr(a, dest, default)
    if v < 0:
        flag = dest.replace("_", "-")
        raise InvalidInputError(f"--{flag} must be >= 0, got {v}", param=flag)
    return v


def json_arg(value: str | dict | None, name: str) -> dict | None:
    """A JSON-object flag value (None / '' -> None)."""
    if value is None or isinstance(value, dict):
        return value
    if not value.strip():
        return None
    try:
        out = json.loads(value)
    except ValueError as e:
        raise InvalidInputError(f"--{name} is not valid JSON: {e}", param=name) from None
    if not isinstance(out, dict):
        raise InvalidInputError(f"--{name} must be a JSON object", param=name)
    return out
