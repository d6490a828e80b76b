"""Command-line flags shared by the stage services, named as in `vllm serve`, with MMPIPE_* env defaults.

Each service adds its own flags and builds ONE config dataclass from the parsed namespace.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

from mmpipe.shared.errors import InvalidInputError


@dataclass
class ServerConfig:
    """What every stage server takes from the shared server flags."""

    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    max_message_mb: int = 256
    shutdown_grace_s: float = 30.0
    log_level: str = "INFO"


def env(name: str, default: Any = None) -> Any:
    return os.environ.get(f"MMPIPE_{name}", default)


def env_int(name: str, default: int) -> int:
    v = env(name)
    return int(v) if v not in (None, "") else default


def env_bool(name: str, default: bool = False) -> bool:
    v = env(name)
    return default if v in (None, "") else v.strip().lower() in ("1", "true", "yes", "on")


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
    g.add_argument("--shutdown-grace-s", type=float, default=float(env("SHUTDOWN_GRACE_S", 30)),
                   help="on SIGTERM, seconds in-flight RPCs get to finish (env MMPIPE_SHUTDOWN_GRACE_S)")
    g.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="env MMPIPE_LOG_LEVEL")


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
                   help="the shared embedding cache, redis://host:port/db (env MMPIPE_REDIS_URL)")


def server_config(a: argparse.Namespace) -> ServerConfig:
    return ServerConfig(host=a.host, port=a.port, metrics_port=a.metrics_port, max_message_mb=a.max_message_mb,
                        shutdown_grace_s=a.shutdown_grace_s, log_level=a.log_level)


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
