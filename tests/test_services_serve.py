"""`mmpipe serve`: the supervised stack starts, restarts a crashed child, and Ctrl-C stops everything."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from services_helpers import qwen2_vl_dir, wait_healthy  # noqa: F401


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
                                 "--device", "cpu", "--shutdown-grace-s", "3"], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        m = _wait_line(log, r"ready; .*ingest (\S+), encoder (\S+), generator (\S+)\.", 120)
        ingest, encoder, generator = m.groups()
        kids = _children(proc.pid)
        assert len(kids) == 4  # redis-server + three stages
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


def test_serve_colocated_encoder_serves_from_the_engine_core(qwen2_vl_dir, tmp_path):
    """--colocate-encoder: no encoder process; the encoder's port is served from the generator's engine-core
    process (one CUDA context on a GPU), and an image chat through the openai client gives transformers' tokens."""
    import base64
    import io

    import openai
    from offline_helpers import chat_prompt, hf_generate, make_image

    from mmpipe.shared.cache.embedded_redis import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mmpipe.cli", "serve", qwen2_vl_dir, "--device", "cpu",
                                 "--colocate-encoder", "--port", str(port), "--grpc-port", str(free_port()),
                                 "--shutdown-grace-s", "3"], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        m = _wait_line(log, r"ready; .*encoder (\S+) \(in the generator engine-core process\), generator (\S+)\.", 180)
        encoder, _ = m.groups()
        names = subprocess.run(["pgrep", "-a", "-P", str(proc.pid)], capture_output=True, text=True).stdout
        assert "mmpipe.cli encoder" not in names and "mmpipe.cli generator" in names, names
        wait_healthy(encoder, timeout_s=5)
        img = make_image(seed=7)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is in the picture?"}]}]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=qwen2_vl_dir, messages=msgs, temperature=0.0, max_tokens=8,
                                           extra_body={"ignore_eos": True, "return_token_ids": True})
        ref_msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
        assert r.choices[0].token_ids == hf_generate(qwen2_vl_dir, chat_prompt(qwen2_vl_dir, ref_msgs), images=[img],
                                                     max_new_tokens=8, add_special_tokens=False)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
