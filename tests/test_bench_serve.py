"""`mmpipe bench serve` against a real served tiny stack on 127.0.0.1: the three stages of tests/services_helpers.py
(tiny qwen2_vl, real redis-server) and a real `mmpipe gateway` process, a handful of streaming requests through the
official openai client; checks what was measured and written, never how fast."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from services_helpers import scrape, start_gateway_process

from mmpipe.bench.client import pct, summarize
from mmpipe.bench.dataset import RandomMultimodalDataset


@pytest.fixture(scope="module")
def gateway(stage_stack, qwen2_vl_dir, tmp_path_factory):
    addrs = {"ingest": stage_stack.ingest_addr, "encoder": stage_stack.encoder_addr,
             "generator": stage_stack.generator_addr}
    gw = start_gateway_process(qwen2_vl_dir, addrs, tmp_path_factory.mktemp("gw-bench"),
                               ["--shutdown-grace-s", "5"])
    gw.wait_healthy()
    yield gw
    gw.stop()


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmpipe.cli", "bench", "serve", *args], capture_output=True,
                          text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _dist_ok(d: dict) -> bool:
    return all(d[k] is not None and d[k] > 0 for k in ("mean", "p50", "p90", "p99")) and d["p50"] <= d["p99"]


@pytest.mark.timeout(300)
def test_concurrency_run_prints_the_table_and_writes_json(gateway, tmp_path):
    result = tmp_path / "r" / "bench.json"
    proc = _bench("--base-url", gateway.url, "--num-prompts", "4", "--max-concurrency", "2", "--image-size", "64",
                  "--reuse-fraction", "0.5", "--pool-size", "2", "--output-len", "4", "--seed", "7",
                  "--time-limit-s", "120", "--result-file", str(result))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(result.read_text())
    assert (res["sent"], res["ok"], res["errors"], res["not_sent"]) == (4, 4, 0, 0)
    assert res["output_tokens"] == 16 and res["req_per_s"] > 0 and res["out_tokens_per_s"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert _dist_ok(res[key]), (key, res[key])
    assert res["e2e_ms"]["p50"] >= res["ttft_ms"]["p50"]
    cfg = res["config"]
    assert (cfg["model"], cfg["api_key"], cfg["max_concurrency"], cfg["request_rate"]) == ("tiny", None, 2, "inf")
    assert res["warmup"] == {"requests": 3, "errors": 0}  # one fresh request, then each pool image once
    for row in ("request throughput (req/s)", "output token throughput (tok/s)", "TTFT (ms)", "TPOT (ms)",
                "ITL (ms)", "E2E (ms)", "failed requests"):
        assert row in proc.stdout, row


@pytest.mark.timeout(300)
def test_poisson_rate_with_every_image_reused_hits_the_cache(gateway, tmp_path):
    hits = lambda: scrape(f"{gateway.url}/metrics", "mmpipe_gateway_mm_cache_hits_total")  # noqa: E731
    before = hits()
    result = tmp_path / "bench.json"
    proc = _bench("--base-url", f"{gateway.url}/v1", "--model", "tiny", "--num-prompts", "3", "--request-rate", "20",
                  "--image-size", "64", "--reuse-fraction", "1", "--pool-size", "1", "--output-len", "3",
                  "--warmup-requests", "0", "--seed", "11", "--result-file", str(result))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(result.read_text())
    assert (res["ok"], res["errors"], res["config"]["request_rate"]) == (3, 0, 20.0)
    assert hits() - before >= 3  # the pool image's warm-up encoded it; every measured request was a hit


def test_failures_are_counted_and_exit_nonzero(tmp_path):
    from mmpipe.shared.cache.embedded_redis import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    proc = _bench("--base-url", url, "--model", "m", "--num-prompts", "2", "--warmup-requests", "0",
                  "--images-per-request", "0", "--request-timeout-s", "5", "--result-file", str(tmp_path / "r.json"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert (res["ok"], res["errors"]) == (0, 2) and "APIConnectionError" in next(iter(res["error_messages"]))
    assert "failed requests" in proc.stdout
    bad = _bench("--base-url", "ftp://x", "--model", "m")
    assert bad.returncode == 2 and "--base-url" in bad.stderr


def test_dataset_reuse_and_summary_percentiles():
    ds = RandomMultimodalDataset(32, pool_size=2, seed=3)
    fresh = ds.sample(5)
    assert len(set(fresh)) == 5 and not set(fresh) & set(ds.pool)
    reused = ds.sample(50, 1.0)
    assert set(reused) <= set(ds.pool)
    assert RandomMultimodalDataset(32, 2, seed=3).sample(5) == fresh  # deterministic for a seed
    assert ds.requests(2, 0) == [(), ()]
    with pytest.raises(ValueError, match="reuse fraction"):
        ds.sample(1, 1.5)
    assert pct([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and pct([], 50) is None
    recs = [{"start": 0.0, "first": 0.1, "last": 0.4, "end": 0.5, "n": 4, "itl": [0.1, 0.1, 0.1], "error": None},
            {"start": 0.0, "first": None, "last": None, "end": 1.0, "n": 0, "itl": [], "error": "boom"}]
    s = summarize(recs, not_sent=1, wall=1.0)
    assert (s["ok"], s["errors"], s["not_sent"], s["output_tokens"], s["req_per_s"]) == (1, 1, 1, 4, 1.0)
    assert math.isclose(s["ttft_ms"]["p50"], 100.0) and math.isclose(s["tpot_ms"]["p99"], 100.0)
    assert math.isclose(s["itl_ms"]["mean"], 100.0) and math.isclose(s["e2e_ms"]["p90"], 500.0)
    assert s["error_messages"] == {"boom": 1}
