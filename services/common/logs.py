"""The one logging setup of every mmpipe process: a terminal line or a JSON object per event, with the request id.

`setup_logging(stage, level, fmt)` routes the root logger to stderr in one of two formats (`--log-format`):

    text  08:03:41.123 INFO  gateway  gateway ready: every stage is SERVING request_id=4f2a rows=3
    json  {"ts": 1764662621.123, "level": "info", "logger": "mmpipe...", "stage": "gateway", "msg": "...",
           "request_id": "4f2a", "rows": 3}

Without a format, text when stderr is a terminal and JSON otherwise (a log collector, a file, a pipe). Fields
beyond the message come from `extra=` of the log call (`logger.info("...", extra={"rows": 3})`); the request id
comes from the `x-request-id` gRPC metadata (set by the gateway, forwarded by every stage client) and lives in a
contextvar, so any line written while serving a call carries it. Nothing else in the project configures handlers.
"""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any, TextIO

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmpipe_request_id", default=None)
REQUEST_ID_HEADER = "x-request-id"

LOG_FORMATS = ("text", "json")

# Attributes every LogRecord has; anything else on a record came from `extra=` and is printed as a field.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime",
                                                                                    "taskName", "request_id"}


def resolve_format(fmt: str | None, stream: TextIO | None = None) -> str:
    """The format to write: `fmt` when given, else text on a terminal and JSON otherwise."""
    if fmt:
        if fmt not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
        return fmt
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def _request_id(record: logging.LogRecord) -> str | None:
    return getattr(record, "request_id", None) or REQUEST_ID.get()


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's `extra=` fields, in the order the call gave them."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, stage, msg, request_id (when known), then the extra fields."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "stage": self.stage, "msg": record.getMessage()}
        rid = _request_id(record)
        if rid:
            out["request_id"] = rid
        for k, v in _fields(record).items():
            out.setdefault(k, v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else str(v)
    return json.dumps(s) if not s or any(c in s for c in ' "=\n\t') else s


class TextFormatter(logging.Formatter):
    """One short line per event: UTC time, level, stage, message, then key=value (request_id first)."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        line = (f"{time.strftime('%H:%M:%S', t)}.{int(record.msecs):03d} {record.levelname:<5} {self.stage} "
                f"{record.getMessage()}")
        rid = _request_id(record)
        fields = {"request_id": rid} if rid else {}
        fields.update(_fields(record))
        if fields:
            line += " " + " ".join(f"{k}={_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_FORMATTERS = {"text": TextFormatter, "json": JsonFormatter}


def setup_logging(stage: str, level: str | int = "INFO", fmt: str | None = None) -> None:
    """Route the root logger to stderr in `fmt` (None: text on a terminal, else JSON); idempotent."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_mmpipe", False):
            root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_FORMATTERS[resolve_format(fmt, sys.stderr)](stage))
    h._mmpipe = True  # type: ignore[attr-defined]
    root.addHandler(h)
    root.setLevel(level if isinstance(level, int) else level.upper())
