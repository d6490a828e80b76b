"""bench/serve_bench.py end to end on the CPU: the whole `mmpipe serve` stack on a tiny Qwen2.5-VL, one level of
streaming chat through the openai client, the stage metrics and the tower section. Checks what was measured
and written, never how fast (slow: make test-slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_bench_cpu_smoke(tmp_path):
    from mmpipe.shared.models.tiny import ensure_tiny_model

    model = str(ensure_tiny_model("qwen2_5_vl"))
    out = tmp_path / "sb"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "serve_bench.py"), "--device", "cpu", "--model", model,
         "--levels", "2", "--requests", "3", "--workloads", "unique", "--warmup-requests", "1", "--pool-size", "1",
         "--output-tokens", "8", "--no-offline", "--no-hf", "--tower-batches", "1", "--tower-time-s", "0.1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "serve_bench.json").read_text())
    (lv,) = res["served"]["levels"]
    assert (lv["workload"], lv["concurrency"], lv["ok"], lv["errors"]) == ("unique", 2, 3, 0)
    assert lv["ttft_ms"]["p50"] > 0 and lv["tpot_ms"]["p50"] > 0 and lv["out_tokens_per_s"] > 0
    procs = lv["processes"]
    assert {"gateway", "ingest", "encoder", "generator", "redis", "client"} <= set(procs)
    hists = procs["gateway"]["metrics"]["histograms"]
    assert any(h.startswith("mmpipe_gateway_request_duration_seconds") and v["count"] == 3 for h, v in hists.items())
    assert procs["encoder"]["metrics"]["histograms"], "the encoder's histograms moved during the level"
    assert res["served"]["stack_exit_status"] == 0
    assert res["tower"]["batches"][0]["img_per_s"] > 0
    md = (out / "serve_bench.md").read_text()
    assert "| unique | 2 | 3 / 3 |" in md and (out / "serve.log").exists()
