"""The gateway's HTTP edge against a hostile client, over real sockets to a real `mmpipe gateway` process
(issue 16, "Found when tried as an attacker would"): the API key is checked on the headers before the body is
read, the body is capped while it streams in, slow headers and bodies are cut off, and a request holds its
--max-concurrent-requests slot from before its body is read. Small caps and timeouts via the flags keep it fast.
The stages are not running: every refusal here happens before any stage would be called.
"""
from __future__ import annotations

import select
import socket
import time
from pathlib import Path

import httpx
import pytest

from mmpipe.shared.cache.embedded_redis import free_port
from services_helpers import scrape, start_gateway_process

KEY = "edge-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from mmpipe.shared.models.tiny import ensure_tiny_model

    model = str(ensure_tiny_model("qwen2_vl"))
    down = {s: f"127.0.0.1:{free_port()}" for s in ("ingest", "encoder", "generator")}
    gw = start_gateway_process(model, down, Path(tmp_path_factory.mktemp("edge")), [
        "--api-key", KEY, "--max-request-body-mb", "1", "--header-read-timeout", str(TIMEOUT_S),
        "--body-read-timeout", str(TIMEOUT_S), "--max-concurrent-requests", "1", "--request-timeout", "3",
        "--shutdown-grace-s", "1"])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and gw.proc.poll() is None:
        try:
            if httpx.get(f"{gw.url}/v1/models", headers=AUTH, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        gw.stop()
        raise RuntimeError(f"gateway did not start:\n{gw.log.read_text(errors='replace')[-3000:]}")
    yield gw
    gw.stop(grace_s=5)


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def _connect(gw) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=10)


def _read_response(s: socket.socket, timeout_s: float = 5.0) -> bytes:
    s.settimeout(timeout_s)
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except (ConnectionResetError, TimeoutError, socket.timeout):
        pass
    return out


def _status(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw.split(b" ", 2)[1])


def _head(path: str, length: int | None, auth: bool, chunked: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if auth:
        lines.append(f"Authorization: Bearer {KEY}")
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _push_body(s: socket.socket, total: int, deadline_s: float) -> tuple[int, bytes]:
    """Write up to `total` body bytes, stopping as soon as the server answers (or drops us)."""
    block = b"x" * (1 << 20)
    sent, raw = 0, b""
    s.setblocking(False)
    t_end = time.monotonic() + deadline_s
    while sent < total and time.monotonic() < t_end:
        readable, writable, _ = select.select([s], [s], [], 0.5)
        if readable:
            break
        if writable:
            try:
                sent += s.send(block[:min(len(block), total - sent)])
            except (BrokenPipeError, ConnectionResetError, BlockingIOError):
                break
    s.setblocking(True)
    return sent, _read_response(s)


def test_300_mb_body_without_a_key_is_a_fast_401_and_costs_no_memory(gateway):
    """Was: the whole body was read and parsed (3-4x its size in memory, ~12 s) before the 401."""
    pid = gateway.proc.pid
    rss0, hwm0 = _rss_kb(pid), _rss_kb(pid, "VmHWM")
    t0 = time.monotonic()
    with _connect(gateway) as s:
        s.sendall(_head("/v1/chat/completions", 300 * (1 << 20), auth=False))
        sent, raw = _push_body(s, 300 * (1 << 20), deadline_s=20)
    elapsed = time.monotonic() - t0
    assert _status(raw) == 401, raw[:300]
    assert b'"authentication_error"' in raw
    assert elapsed < 3.0, elapsed
    assert sent < 64 * (1 << 20), sent  # the client was stopped long before it could send the whole body
    assert _rss_kb(pid) - rss0 < 8 * 1024 and _rss_kb(pid, "VmHWM") - hwm0 < 8 * 1024, (rss0, _rss_kb(pid))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_with_a_key_is_413(gateway, chunked):
    """Was: no cap at all. Content-Length above --max-request-body-mb is refused before reading; a chunked
    body as soon as it passes the cap."""
    with _connect(gateway) as s:
        s.sendall(_head("/v1/completions", None if chunked else 2 << 20, auth=True, chunked=chunked))
        if chunked:
            piece = b"x" * 65536
            frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            s.setblocking(False)
            for _ in range(64):  # 4 MiB at most
                r, w, _ = select.select([s], [s], [], 0.5)
                if r:
                    break
                if w:
                    try:
                        s.send(frame)
                    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                        break
            s.setblocking(True)
        raw = _read_response(s)
    assert _status(raw) == 413, raw[:300]
    assert b"--max-request-body-mb" in raw and b'"param":"body"' in raw


def test_headers_dripped_one_byte_at_a_time_are_cut_off(gateway):
    """Was: a client sending its headers a byte at a time held the connection open indefinitely."""
    head = _head("/v1/completions", 10, auth=True)
    with _connect(gateway) as s:
        t0 = time.monotonic()
        closed_at = None
        for b in head[:40]:  # 40 bytes at 4/s: 10 s if nobody cuts us off
            try:
                s.send(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                break
            r, _, _ = select.select([s], [], [], 0.25)
            if r:
                break
        raw = _read_response(s, timeout_s=3)
        closed_at = time.monotonic() - t0
    assert _status(raw) == 408 and b"--header-read-timeout" in raw, raw[:300]
    assert closed_at < TIMEOUT_S + 1.5, closed_at


def test_body_dripped_one_byte_at_a_time_is_cut_off(gateway):
    """Was: no body deadline; now 408 within --body-read-timeout, and the concurrency slot is given back."""
    with _connect(gateway) as s:
        s.sendall(_head("/v1/completions", 200, auth=True))
        t0 = time.monotonic()
        for _ in range(40):
            try:
                s.send(b" ")
            except (BrokenPipeError, ConnectionResetError):
                break
            r, _, _ = select.select([s], [], [], 0.25)
            if r:
                break
        raw = _read_response(s, timeout_s=3)
        elapsed = time.monotonic() - t0
    assert _status(raw) == 408 and b"--body-read-timeout" in raw, raw[:300]
    assert elapsed < TIMEOUT_S + 1.5, elapsed


def test_a_request_holds_its_concurrency_slot_before_its_body_is_read(gateway):
    """Was: --max-concurrent-requests counted a request only after its body was parsed, so slow uploads were
    free. With a limit of 1, a request still sending its body makes the next one a 429."""
    with _connect(gateway) as s:
        s.sendall(_head("/v1/completions", 100, auth=True))  # the body never comes
        time.sleep(0.2)
        second = httpx.post(f"{gateway.url}/v1/completions", headers=AUTH, timeout=5,
                            json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
        assert second.status_code == 429, second.text
        assert "max-concurrent-requests" in second.json()["error"]["message"]
        assert _status(_read_response(s, timeout_s=3)) == 408
    # the slot is free again: the next request gets past admission (to the stages, which are down here)
    third = httpx.post(f"{gateway.url}/v1/completions", headers=AUTH, timeout=10,
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
    assert third.status_code != 429, third.text


def test_the_gateway_keeps_serving_and_counts_connections(gateway):
    with _connect(gateway) as s:  # one more cut connection, whichever test ran before
        s.sendall(b"GET /v1/mo")
        assert _status(_read_response(s, timeout_s=3)) == 408
    assert httpx.get(f"{gateway.url}/v1/models", headers=AUTH, timeout=5).status_code == 200
    bad = httpx.get(f"{gateway.url}/v1/models", timeout=5)
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    metrics = f"{gateway.url}/metrics"
    assert scrape(metrics, "mmpipe_gateway_http_connections_total") >= 3
    assert scrape(metrics, "mmpipe_gateway_http_open_connections") >= 1  # this scrape's own
    assert scrape(metrics, "mmpipe_gateway_http_requests_cut_total", reason="header_timeout") >= 1
    assert gateway.proc.poll() is None
