"""`make run` runs `mmpipe quickstart`: the whole stack starts, answers one request, and stops cleanly."""
from __future__ import annotations

import os
import subprocess
import sys

from mmpipe.shared.cache.embedded_redis import free_port


def test_quickstart_once_answers_and_stops(tmp_path):
    env = dict(os.environ, MMPIPE_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "mmpipe.cli", "quickstart", "--once", "--port", str(free_port()),
           "--grpc-port", str(free_port()), "--startup-timeout-s", "240"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert ">> answer (" in done.stdout and "image, video, audio in one request" in done.stdout
    assert "mmpipe serve: stopping" in done.stdout
