"""The LM's projection GEMMs at a short step's token counts, cuBLAS's default choice against PyTorch TunableOp's
search over the cuBLASLt algorithms (a probe for issue 12's cached-turn step, whose 104 tokens after a cached
prefix run as a 128-token mixed graph: weight-read-bound, so time is bytes of weight over bandwidth).

    python bench/gemm_shapes_probe.py --out bench/results/gemm_shapes_h200.json

For each (tokens, projection) of a Qwen2.5-VL-3B-sized LM (hidden 2048, intermediate 11008, 16 q / 2 kv heads
of 128), bf16: GPU us per call replayed from a CUDA graph (20 calls), the weight bytes per us (TB/s), first
with torch's default GEMM and then with `torch.cuda.tunable` on (tuning runs eagerly, before the capture).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

PROJ = {"qkv (bias)": (2048, 2560, True), "o_proj": (2048, 2048, False), "gate_up": (2048, 22016, False),
        "down": (11008, 2048, False)}


def graph_us(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="104,128,256,1000")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    dt = torch.bfloat16
    torch.manual_seed(0)
    weights = {name: (torch.randn(n, k, device="cuda", dtype=dt) * 0.02,
                      torch.randn(n, device="cuda", dtype=dt) if bias else None) for name, (k, n, bias) in PROJ.items()}
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for mode in ("default", "tunable"):
        if mode == "tunable":
            torch.cuda.tunable.enable(True)
            torch.cuda.tunable.tuning_enable(True)
            torch.cuda.tunable.set_max_tuning_duration(30)
            torch.cuda.tunable.set_filename(str(Path(a.out or "/tmp/gemm").with_suffix("")) + "_tunableop.csv")
        total: dict[int, float] = {}
        for m in (int(x) for x in a.tokens.split(",")):
            x = {name: torch.randn(m, k, device="cuda", dtype=dt) for name, (k, _, _) in PROJ.items()}
            for name, (w, b) in weights.items():
                fn = (lambda xx=x[name], ww=w, bb=b: F.linear(xx, ww, bb))
                fn()  # tunable: the search runs here, eagerly
                us = graph_us(fn)
                tbs = w.numel() * w.element_size() / (us * 1e-6) / 1e12
                total[m] = total.get(m, 0.0) + us
                res["rows"].append({"mode": mode, "tokens": m, "proj": name, "us": us, "weight_TBps": tbs})
                print(f"[{mode:8s}] tokens {m:5d} {name:11s} {us:7.1f} us  {tbs:5.2f} TB/s of weight", flush=True)
        for m, t in total.items():
            print(f"[{mode:8s}] tokens {m:5d} all four: {t:7.1f} us a layer, x36 = {36 * t / 1e3:.2f} ms", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
