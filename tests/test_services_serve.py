"""`mmpipe serve`: the supervised stack starts, restarts a crashed child, and Ctrl-C stops everything."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from services_helpers import wait_healthy


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _wait_line(path, pattern: str, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text(errors="replace"))
        if m:
            return m
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not seen; log:\n{path.read_text(errors='replace')[-3000:]}")


def test_serve_supervises_and_stops_cleanly(qwen2_vl_dir, tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mmpipe.cli", "serve", qwen2_vl_dir, "--no-gateway",
                                 "--device", "cpu", "--shutdown-grace-s", "3",
                                 "--stage-env", "generator:MMPIPE_TEST_STAGE_MARK=gen-only"],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        m = _wait_line(log, r"ready; .*ingest (\S+), encoder (\S+), generator (\S+)\.", 120)
        ingest, encoder, generator = m.groups()
        kids = _children(proc.pid)
        assert len(kids) == 4  # redis-server + three stages
        # --stage-env reaches the generator's process and no other
        marked = [k for k in kids if b"MMPIPE_TEST_STAGE_MARK=gen-only" in open(f"/proc/{k}/environ", "rb").read()]
        assert len(marked) == 1 and b"mmpipe.cli\x00generator" in open(f"/proc/{marked[0]}/cmdline", "rb").read()
        # kill the encoder: serve restarts it on the same port
        enc_pid = int(subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "mmpipe.cli encoder"], capture_output=True,
                                     text=True).stdout.split()[0])
        os.kill(enc_pid, signal.SIGKILL)
        _wait_line(log, r"encoder exited with status -9; restarting", 10)
        wait_healthy(encoder, timeout_s=60)
        for addr in (ingest, generator):
            wait_healthy(addr, timeout_s=5)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    time.sleep(0.2)
    assert _children(proc.pid) == []
    for k in kids:
        assert not os.path.exists(f"/proc/{k}") or open(f"/proc/{k}/stat").read().split()[2] == "Z"


def test_serve_gives_each_child_one_openmp_thread_unless_told():
    """Six processes with one OpenMP thread per core oversubscribed a 16-core GPU box (BENCHMARKS.md): serve
    gives each child OMP_NUM_THREADS=1, except the CPU-run models (they use the cores) and when the user set it."""
    from mmpipe.commands.serve import _child_env

    assert _child_env({}, "gateway", on_gpu=False)["OMP_NUM_THREADS"] == "1"
    assert _child_env({}, "ingest", on_gpu=False)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in _child_env({}, "generator", on_gpu=False)
    assert _child_env({}, "encoder", on_gpu=True)["OMP_NUM_THREADS"] == "1"
    assert _child_env({"OMP_NUM_THREADS": "4"}, "generator", on_gpu=True)["OMP_NUM_THREADS"] == "4"
    assert _child_env({}, "generator", on_gpu=True, own={"OMP_NUM_THREADS": "8"})["OMP_NUM_THREADS"] == "8"


def test_stage_env_values_are_checked():
    import pytest

    from mmpipe.commands.serve import parse_stage_env

    assert parse_stage_env(["encoder:A=1", "encoder:B=x=y", "gateway:C="]) == {
        "encoder": {"A": "1", "B": "x=y"}, "gateway": {"C": ""}}
    for bad in ("encoder", "tower:A=1", "encoder:=1", "encoder:A", "encoder:A B=1"):
        with pytest.raises(ValueError, match="STAGE:KEY=VALUE"):
            parse_stage_env([bad])
