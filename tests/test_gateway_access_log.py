"""Logs of a real `mmpipe gateway` process: one access-log line per request (HTTP, streaming, the public gRPC API),
JSON or text (`--log-format`), and none with `--disable-uvicorn-access-log`.

Real processes: the three stages of tests/services_helpers.py on the tiny qwen2_vl model with a real redis-server,
the gateway in front of them, the official `openai` client and `mmpipe.client` for gRPC; the assertions read the
gateway's own log file (its stderr).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from services_helpers import start_gateway_process

from mmpipe.services.common.logs import JsonFormatter, TextFormatter, resolve_format


def _gateway(stage_stack, model_dir, log_dir: Path, extra: list[str]):
    addrs = {"ingest": stage_stack.ingest_addr, "encoder": stage_stack.encoder_addr,
             "generator": stage_stack.generator_addr}
    gw = start_gateway_process(model_dir, addrs, log_dir, ["--shutdown-grace-s", "5", *extra])
    gw.wait_healthy()
    return gw


@pytest.fixture(scope="module")
def json_gateway(stage_stack, qwen2_vl_dir, tmp_path_factory):
    gw = _gateway(stage_stack, qwen2_vl_dir, tmp_path_factory.mktemp("gw-json"),
                  ["--log-format", "json", "--disable-access-log-for-endpoints", "/health"])
    yield gw
    gw.stop()


def _json_lines(log: Path) -> list[dict]:
    """Every JSON log line of the file (uvicorn's or the gateway's); the file holds nothing else."""
    out = []
    for line in log.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))  # a non-JSON line fails the test: --log-format json means every line
    return out


def _access(log: Path, request_id: str, timeout_s: float = 10.0) -> list[dict]:
    """The access lines of one request id (bounded wait: a stream's line is written after its last byte)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = [r for r in _json_lines(log) if r["logger"] == "mmpipe.access" and r.get("request_id") == request_id]
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_http_and_streaming_requests_log_one_line_each(json_gateway):
    cl = openai.OpenAI(base_url=f"{json_gateway.url}/v1", api_key="none", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": "Say something."}]
    out = cl.chat.completions.with_raw_response.create(model="tiny", messages=msgs, max_tokens=5, temperature=0,
                                                       extra_body={"ignore_eos": True},
                                                       extra_headers={"X-Request-Id": "acc-plain"})
    usage = out.parse().usage
    (line,) = _access(json_gateway.log, "acc-plain")
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/chat/completions", 200)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage.prompt_tokens, 5)
    assert line["stage"] == "gateway" and line["level"] == "info" and line["latency_ms"] > 0
    assert isinstance(line["ts"], float) and line["msg"] == "access"

    stream = cl.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": "acc-stream"})
    t0 = time.perf_counter()
    pieces = [c for c in stream]
    stream_ms = (time.perf_counter() - t0) * 1000
    assert pieces
    (line,) = _access(json_gateway.log, "acc-stream")
    assert (line["path"], line["status"], line["completion_tokens"]) == ("/v1/chat/completions", 200, 4)
    assert line["prompt_tokens"] == usage.prompt_tokens
    assert line["latency_ms"] >= stream_ms * 0.5  # the whole stream's time, written when it ended

    # a client error: the status actually sent, no tokens (nothing was generated)
    with pytest.raises(openai.BadRequestError):
        cl.chat.completions.create(model="tiny", messages=msgs, max_tokens=-1,
                                   extra_headers={"X-Request-Id": "acc-bad"})
    (line,) = _access(json_gateway.log, "acc-bad")
    assert line["status"] == 400 and "prompt_tokens" not in line

    # endpoints other than the generating ones, and the excluded /health
    r = httpx.get(f"{json_gateway.url}/v1/models", headers={"X-Request-Id": "acc-models"}, timeout=10)
    assert r.status_code == 200
    (line,) = _access(json_gateway.log, "acc-models")
    assert (line["method"], line["path"], line["status"]) == ("GET", "/v1/models", 200)
    httpx.get(f"{json_gateway.url}/health", headers={"X-Request-Id": "acc-health"}, timeout=10)
    r = httpx.get(f"{json_gateway.url}/nope", headers={"X-Request-Id": "acc-404"}, timeout=10)
    assert r.status_code == 404
    (line,) = _access(json_gateway.log, "acc-404")
    assert line["status"] == 404
    assert _access(json_gateway.log, "acc-health", timeout_s=0.5) == []
    # uvicorn's own access log is off: no other line names these requests' paths
    assert not [r for r in _json_lines(json_gateway.log) if r["logger"].startswith("uvicorn.access")]


def test_grpc_requests_log_one_line_each(json_gateway):
    from mmpipe.client import MMPipeClient

    with MMPipeClient(json_gateway.grpc_addr, timeout=60) as cl:
        out = cl.generate("The quick brown fox", temperature=0.0, max_tokens=3, ignore_eos=True,
                          request_id="acc-grpc")
        chunks = list(cl.chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], stream=True,
                              temperature=0.0, max_tokens=2, ignore_eos=True, request_id="acc-grpc-stream"))
        assert chunks
        cl.tokenize("hello there", request_id="acc-grpc-tok")
    (line,) = _access(json_gateway.log, "acc-grpc")
    assert (line["method"], line["path"], line["status"]) == ("GRPC", "/mmpipe.v1.Gateway/Generate", "OK")
    assert (line["prompt_tokens"], line["completion_tokens"]) == (out.usage["prompt_tokens"], 3)
    (line,) = _access(json_gateway.log, "acc-grpc-stream")
    assert (line["path"], line["completion_tokens"]) == ("/mmpipe.v1.Gateway/Chat", 2)
    (line,) = _access(json_gateway.log, "acc-grpc-tok")
    assert (line["path"], line["status"]) == ("/mmpipe.v1.Gateway/Tokenize", "OK") and "prompt_tokens" not in line


def test_text_format_and_the_access_log_off(stage_stack, qwen2_vl_dir, tmp_path):
    gw = _gateway(stage_stack, qwen2_vl_dir, tmp_path, ["--log-format", "text", "--disable-uvicorn-access-log"])
    try:
        r = httpx.post(f"{gw.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                       headers={"X-Request-Id": "acc-off"}, timeout=60)
        assert r.status_code == 200
    finally:
        gw.stop()
    lines = [ln for ln in gw.log.read_text().splitlines() if ln.strip()]
    # every line starts with the time, the level and the stage, then the message (a traceback would break this)
    head = re.compile(r"\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR) +gateway \S")
    assert all(head.match(ln) for ln in lines), lines
    assert any("gateway ready" in ln for ln in lines)
    assert not [ln for ln in lines if "acc-off" in ln or "/v1/completions" in ln]  # no access line at all


def _record(msg: str, **extra):
    import logging

    rec = logging.LogRecord("mmpipe.x", logging.WARNING, __file__, 1, msg, None, None)
    rec.__dict__.update(extra)
    return rec


def test_formatters_carry_the_extra_fields():
    rec = _record("cache miss", request_id="r1", items=2, url="http://a b", shape=[1, 2])
    assert TextFormatter("ingest").format(rec).split(" ", 1)[1] == (
        'WARNING ingest cache miss request_id=r1 items=2 url="http://a b" shape="[1, 2]"')
    out = json.loads(JsonFormatter("ingest").format(rec))
    assert out == {"ts": round(rec.created, 3), "level": "warning", "logger": "mmpipe.x", "stage": "ingest",
                   "msg": "cache miss", "request_id": "r1", "items": 2, "url": "http://a b", "shape": [1, 2]}


def test_format_follows_the_terminal_unless_given(tmp_path):
    import os

    master, slave = os.openpty()  # a real terminal
    with os.fdopen(slave, "w") as tty, open(tmp_path / "log", "w") as file:
        assert (resolve_format(None, tty), resolve_format(None, file)) == ("text", "json")
        assert resolve_format("json", tty) == "json" and resolve_format("text", file) == "text"
    os.close(master)
    with pytest.raises(ValueError, match="--log-format"):
        resolve_format("xml")


def test_serve_gives_its_log_format_to_every_child():
    from mmpipe.cli import build_parser
    from mmpipe.commands.serve import child_argvs

    args = build_parser().parse_args(["serve", "m", "--log-format", "text", "--disable-uvicorn-access-log"])
    argvs = child_argvs(args, {"encoder": 1, "generator": 2, "ingest": 3}, "redis://127.0.0.1:1")
    assert set(argvs) == {"encoder", "generator", "ingest", "gateway"}
    for name, argv in argvs.items():
        i = argv.index("--log-format")
        assert argv[i + 1] == "text" and argv.count("--log-format") == 1, name
    assert "--disable-access-log" in argvs["gateway"] and "--disable-access-log" not in argvs["ingest"]


def test_a_bad_log_format_variable_is_a_one_line_error():
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mmpipe.cli", "ingest", "--model", "m", "--redis-url", "redis://x",
                          "--encoder-addr", "127.0.0.1:1"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "MMPIPE_LOG_FORMAT": "xml"})
    assert out.returncode == 2 and out.stderr.strip() == "mmpipe: MMPIPE_LOG_FORMAT='xml' is not one of text, json"
