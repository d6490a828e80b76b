"""One JSON-lines logging setup for every service, carrying the request id of the call being served.

The request id comes from the `x-request-id` gRPC metadata (set by the gateway, forwarded by every stage
client) and lives in a contextvar, so any log line written while serving a call carries it.
"""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmpipe_request_id", default=None)
REQUEST_ID_HEADER = "x-request-id"


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "service": self.service,
               "logger": record.name, "msg": record.getMessage()}
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        if rid:
            out["request_id"] = rid
        for k in ("rpc", "code", "duration_s", "items", "batch_size"):
            v = getattr(record, k, None)
            if v is not None:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(service: str, level: str | int = "INFO") -> None:
    """Route the root logger to stderr as JSON lines (idempotent)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_mmpipe", False):
            root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter(service))
    h._mmpipe = True  # type: ignore[attr-defined]
    root.addHandler(h)
    root.setLevel(level if isinstance(level, int) else level.upper())
    logging.Formatter.converter = time.gmtime
