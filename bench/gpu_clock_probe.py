"""Probe: does the GPU keep its clock under back-to-back GEMMs? One prefill-sized GEMM of the 3B model
(1,000 x 2,048 @ 2,048 x 22,016, bf16: the packed gate/up projection) timed three ways, with nvidia-smi
sampling the SM clock, power and throttle reasons every 100 ms:

- "gapped": one GEMM, then the host sleeps 2 ms (what an eager, host-bound step gives the GPU);
- "eager burst": 200 GEMMs launched back to back;
- "graph burst": 36 GEMMs captured in a CUDA graph, replayed 20 times (what a replayed step gives the GPU);
each with random normal weights (std 0.02, like the benchmarks' random checkpoints) and with zero weights
(same shapes and kernels, far less switching power).

    python bench/gpu_clock_probe.py --out bench/results/gpu_clock_probe.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

QUERY = "timestamp,clocks.sm,power.draw,power.limit,temperature.gpu,clocks_throttle_reasons.active"


def _smi_start(path: str):
    try:
        return subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                                 "-lms", "100"], stdout=open(path, "w"), stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        return None


def _smi_rows(path: str) -> list[tuple[float, float, float, str]]:
    """(unix time, SM MHz, watts, active throttle reasons) per sample."""
    rows = []
    for line in Path(path).read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            stamp, _, frac = parts[0].partition(".")
            t = time.mktime(time.strptime(stamp, "%Y/%m/%d %H:%M:%S")) + float("0." + (frac or "0"))
            rows.append((t, float(parts[1]), float(parts[2]), parts[5]))
        except (ValueError, IndexError):
            continue
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--m", type=int, default=1000)
    args = ap.parse_args(argv)
    dev = "cuda"
    M, K, N = args.m, 2048, 22016
    flops = 2 * M * K * N
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    smi_path = tempfile.mktemp(suffix=".csv")
    smi = _smi_start(smi_path)
    time.sleep(1.0)
    res = {"device": torch.cuda.get_device_name(), "shape": [M, K, N], "phases": []}
    for weights in ("random", "zeros"):
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 if weights == "random" else \
            torch.zeros(N, K, device=dev, dtype=torch.bfloat16)
        out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
        for _ in range(5):
            torch.mm(x, w.t(), out=out)
        torch.cuda.synchronize()

        def gapped():
            ts = []
            for _ in range(100):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                torch.mm(x, w.t(), out=out)
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1))
                time.sleep(0.002)
            return statistics.median(ts)

        def burst():
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(400):
                torch.mm(x, w.t(), out=out)
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / 400

        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            torch.mm(x, w.t(), out=out)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            for _ in range(36):
                torch.mm(x, w.t(), out=out)

        def graph():
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(20):
                g.replay()
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / (20 * 36)

        for name, fn in (("gapped", gapped), ("eager burst", burst), ("graph burst", graph)):
            time.sleep(0.5)
            t0 = time.time()
            ms = fn()
            t1 = time.time()
            res["phases"].append(dict(weights=weights, phase=name, us_per_gemm=1e3 * ms,
                                      tflops=flops / (ms * 1e-3) / 1e12, t0=t0, t1=t1))
        del g, w, out
        torch.cuda.empty_cache()
    time.sleep(0.3)
    if smi is not None:
        smi.terminate()
        smi.wait()
        rows = _smi_rows(smi_path)
        for p in res["phases"]:
            inside = [r for r in rows if p["t0"] - 0.05 <= r[0] <= p["t1"] + 0.05]
            p["sm_mhz"] = [r[1] for r in inside]
            p["watts"] = [r[2] for r in inside]
            p["throttle_reasons"] = sorted({r[3] for r in inside})
        res["smi_samples"] = len(rows)
    print(f"{res['device']}: GEMM {M}x{K} @ {K}x{N} bf16")
    print("weights  phase         us/GEMM  TFLOP/s  SM MHz (min-max)  W (max)  throttle reasons")
    for p in res["phases"]:
        mhz, watts = p.get("sm_mhz") or [0], p.get("watts") or [0]
        print(f"{p['weights']:8s} {p['phase']:12s} {p['us_per_gemm']:8.1f} {p['tflops']:8.1f}  {min(mhz):6.0f}-{max(mhz):<6.0f}"
              f"  {max(watts):7.0f}  {','.join(p.get('throttle_reasons', []))}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
