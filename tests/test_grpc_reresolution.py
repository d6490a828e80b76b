"""New replicas get traffic: servers close connections after --grpc-max-connection-age-ms, and a stage client
(`make_channel`, round_robin over a `dns:` name) then reconnects, re-resolving the name, so a replica that joined
behind the same name gets calls.

Real processes: servers built by `services.common.grpc_server.serve` from the real stage flags
(tests/grpc_whoami_server.py, answering with their pid), and a name served by a DNS server the test controls
(tests/dns_helpers.py: gRPC's c-ares resolver takes the DNS server from the target,
`dns://127.0.0.1:PORT/name:port`, so neither /etc/hosts nor the system resolver is touched). Test traffic stays
on 127.0.0.1, so the second replica joins the first one's address instead of a second A record: gRPC servers
bind with SO_REUSEPORT, and the kernel spreads new connections over every listener of the port, as a Service's
virtual IP spreads them over its pods. Without a connection age the client's one connection never moves, so
the replica that joined gets nothing (checked: 0 calls in 15 s with the age at 0).
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dns_helpers import LocalDNS
from services_helpers import wait_healthy

from mmpipe.services.common.cli_args import add_server_args, server_config
from mmpipe.services.common.grpc_server import server_options
from mmpipe.shared.cache.embedded_redis import free_port

HERE = Path(__file__).resolve().parent
AGE_MS = 300
NAME = "encoder.mmpipe.test"


def _start(host: str, port: int, log: Path, age_ms: int = AGE_MS) -> subprocess.Popen:
    argv = [sys.executable, str(HERE / "grpc_whoami_server.py"), "--model", "none", "--host", host, "--port",
            str(port), "--grpc-max-connection-age-ms", str(age_ms), "--grpc-max-connection-age-grace-ms", "1000",
            "--shutdown-grace-s", "1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_healthy(f"{host}:{port}", timeout_s=30, proc=proc, log_path=log)
    return proc


def test_connection_age_flags_reach_the_server_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    p = argparse.ArgumentParser()
    add_server_args(p, default_port=0)
    cfg = server_config(p.parse_args(["--model", "m"]))
    assert (cfg.max_connection_age_ms, cfg.max_connection_age_grace_ms) == (300_000, 600_000)  # the defaults
    monkeypatch.setenv("MMPIPE_GRPC_MAX_CONNECTION_AGE_MS", "1234")
    p = argparse.ArgumentParser()
    add_server_args(p, default_port=0)
    cfg = server_config(p.parse_args(["--model", "m", "--grpc-max-connection-age-grace-ms", "0"]))
    opts = dict(server_options(max_connection_age_ms=cfg.max_connection_age_ms,
                               max_connection_age_grace_ms=cfg.max_connection_age_grace_ms))
    assert opts["grpc.max_connection_age_ms"] == 1234 and "grpc.max_connection_age_grace_ms" not in opts
    assert "grpc.max_connection_age_ms" not in dict(server_options(max_connection_age_ms=0))
    from mmpipe.shared.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="--grpc-max-connection-age-ms"):
        server_config(p.parse_args(["--model", "m", "--grpc-max-connection-age-ms", "-1"]))


def test_client_reaches_a_replica_that_joined_behind_its_name(tmp_path: Path) -> None:
    from mmpipe.services.common.stage_clients import make_channel

    if os.environ.get("GRPC_DNS_RESOLVER", "ares").lower() != "ares":
        pytest.skip("a DNS server in the target (dns://HOST:PORT/name) needs gRPC's c-ares resolver")
    port = free_port()
    procs = [_start("127.0.0.1", port, tmp_path / "a.log")]
    try:
        with LocalDNS() as dns:
            dns.set(NAME, ["127.0.0.1"])

            async def run() -> tuple[list[str], list[str], float]:
                channel = make_channel(dns.target(NAME, port), min_reresolve_ms=100)
                who = channel.unary_unary("/mmpipe.test.Whoami/Who")
                try:
                    before = [(await who(b"", timeout=5)).decode() for _ in range(10)]
                    procs.append(await asyncio.to_thread(_start, "127.0.0.1", port, tmp_path / "b.log"))
                    t0 = time.monotonic()
                    after: list[str] = []
                    first_b = None
                    # bounded by count and time: 20 calls once the new replica answered, or 15 s
                    while len(after) < 2000 and time.monotonic() - t0 < 15:
                        after.append((await who(b"", timeout=5)).decode())
                        if first_b is None and after[-1] != before[0]:
                            first_b, stop_at = time.monotonic() - t0, len(after) + 20
                        if first_b is not None and len(after) >= stop_at:
                            break
                        await asyncio.sleep(0.01)
                    return before, after, (first_b if first_b is not None else float("inf"))
                finally:
                    await channel.close()

            before, after, first_b = asyncio.run(run())
        pids = {str(p.pid) for p in procs}
        assert len(set(before)) == 1 and before[0].rsplit("/", 1)[1] == str(procs[0].pid), before
        assert first_b < 15, f"the new replica got no call in 15 s (answers: {sorted(set(after))})"
        assert {a.rsplit("/", 1)[1] for a in after} <= pids
        print(f"new replica's first call {first_b:.2f} s after it joined (age {AGE_MS} ms)")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
