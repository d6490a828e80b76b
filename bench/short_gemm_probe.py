"""The LM's projections at a short step's row counts: cuBLAS against the Triton short-step GEMM
(shared/engine/kernels/triton_gemm.py) over a grid of tiles, for issue 12's cached-turn step (104 new tokens
after a cached prefix run as a 128-row mixed graph).

    python bench/short_gemm_probe.py --out bench/results/short_gemm_h200.json

A Qwen2.5-VL-3B-sized LM (hidden 2048, intermediate 11008, 16 q / 2 kv heads of 128), bf16, 36 layers of
DISTINCT random weights, so that each timed call reads its weight from HBM as the model does (one weight reused
20 times would sit in L2: 10 MB of q/k/v fits). Each variant runs the 36 layers' calls in one CUDA graph; the
time is GPU us per layer. gate_up is timed with its epilogue: cuBLAS's F.linear then the engine's silu_mul
kernel, against the Triton kernel with silu(gate) * up fused. Prints the best tiles per projection and row count.

    python bench/short_gemm_probe.py --proj gate_up --rows 16,32,64 --engine /tmp/mmpipe-bench/qwen2_5_vl_3b_random

--engine also times whole engine steps on that model: two offline `LLM`s, one with the MLP's short-step GEMM up
to 64 rows (`TritonOps.short_gemm_max_rows`, fixed when the CUDA graphs are captured) and one with cuBLAS and
silu_mul at every row count; the GPU time of one replay of each captured decode graph (batch 1-64) and small
mixed / prefill-only graph, on the graphs' padding inputs (every GEMM runs in full; attention over empty rows).
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from engine_bench import replay_ms  # bench/ is the script's folder
from mmpipe.shared.engine.kernels.triton_fused import silu_mul
from mmpipe.shared.engine.kernels.triton_gemm import GemmTile, short_gate_up_silu, short_linear

LAYERS = 36
PROJ = {"qkv": (2048, 2560, True), "o_proj": (2048, 2048, False), "gate_up": (2048, 22016, False),
        "down": (11008, 2048, False)}
GRID = {
    "gate_up": dict(block_n=(32, 64), block_k=(64, 128), split_k=(1, 2), num_warps=(4, 8)),
    "down": dict(block_n=(64, 128), block_k=(64, 128), split_k=(2, 4, 8), num_warps=(4, 8)),
    "qkv": dict(block_n=(64, 128), block_k=(64, 128), split_k=(1, 2, 4), num_warps=(4, 8)),
    "o_proj": dict(block_n=(64, 128), block_k=(64, 128), split_k=(1, 2, 4), num_warps=(4, 8)),
}


def graph_us(fn) -> float:
    """GPU us of fn() (which runs all LAYERS calls) replayed from a CUDA graph, per layer."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        best = min(best, e0.elapsed_time(e1) * 1e3 / LAYERS)
    return best


def tiles(name: str):
    grid = GRID[name]
    for vals in itertools.product(*grid.values()):
        t = dict(zip(grid, vals))
        t["num_stages"] = 4 if t["block_k"] == 64 else 3  # two 128-row tiles of 128 bf16 a stage: 3 fit in smem
        yield GemmTile(**t)


def engine_ab(model: str) -> dict:
    """GPU us of one replay of each captured graph on two engines over `model`: cuBLAS and silu_mul at every row
    count (short_gemm_max_rows 0) against the short-step GEMM up to 64 rows (the engine's default). Session 9's
    run 22 timed the fused decode GEMV this replaced at 1-8 rows with the probe of its commit (BENCHMARKS.md)."""
    from mmpipe import LLM
    from mmpipe.shared.engine.kernels.triton_ops import TritonOps

    default = TritonOps.short_gemm_max_rows
    out: dict = {}
    try:
        for i, (name, cap) in enumerate((("cublas", 0), ("short", 64))):
            TritonOps.short_gemm_max_rows = cap
            llm = LLM(model, max_num_seqs=64, max_model_len=4096, gpu_memory_utilization=0.3 * (i + 1))
            r = llm.engine.runner
            sets = [("decode", r.graphs), ("mixed", r.mixed_graphs), ("prefill-only", r.prefill_graphs)]
            for kind, gs in sets:
                for size in (1, 2, 4, 8, 16, 32, 48, 64, 128):
                    if gs is not None and size in gs.graphs:
                        us = replay_ms(gs.graphs[size], 20) * 1e3
                        out.setdefault(f"{kind}@{size}", {})[name] = us
            del llm, r
            torch.cuda.empty_cache()
    finally:
        TritonOps.short_gemm_max_rows = default
    for key, v in out.items():
        if len(v) == 2:
            print(f"[engine {key:16s}] cublas {v['cublas']:7.1f} us, short-step GEMM {v['short']:7.1f} us: "
                  f"x{v['cublas'] / v['short']:.3f}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="128,64")
    ap.add_argument("--proj", default=",".join(PROJ))
    ap.add_argument("--out", default="")
    ap.add_argument("--engine", default="", help="a model dir: A/B whole engine steps (see above)")
    a = ap.parse_args(argv)
    dt = torch.bfloat16
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [], "best": {}}
    total = {}
    for name in a.proj.split(","):
        k, n, bias = PROJ[name]
        ws = [torch.randn(n, k, device="cuda", dtype=dt) * k ** -0.5 for _ in range(LAYERS)]
        bs = [torch.randn(n, device="cuda", dtype=dt) * 0.1 if bias else None for _ in range(LAYERS)]
        wbytes = n * k * 2
        for m in (int(r) for r in a.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dt)
            if name == "gate_up":
                half = n // 2

                def ref_fn(w, b):
                    gu = F.linear(x, w)
                    return silu_mul(gu[:, :half], gu[:, half:])
                tri_fn = lambda w, b, t: short_gate_up_silu(x, w, t)  # noqa: E731
            else:
                ref_fn = lambda w, b: F.linear(x, w, b)  # noqa: E731
                tri_fn = lambda w, b, t: short_linear(x, w, b, t)  # noqa: E731
            want = ref_fn(ws[0], bs[0]).float()
            base = graph_us(lambda: [ref_fn(w, b) for w, b in zip(ws, bs)])
            print(f"[{name:7s} M={m:3d}] cublas{' + silu_mul' if name == 'gate_up' else ''}: {base:6.1f} us "
                  f"({wbytes / base / 1e6:4.2f} TB/s)", flush=True)
            best = (base, "cublas")
            for t in tiles(name):
                try:
                    got = tri_fn(ws[0], bs[0], t).float()
                    err = ((got - want).abs().max() / want.abs().max()).item()
                    us = graph_us(lambda t=t: [tri_fn(w, b, t) for w, b in zip(ws, bs)])
                except Exception as e:  # noqa: BLE001 - a tile that does not fit (shared memory) is skipped
                    print(f"   {t}: failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                res["rows"].append({"proj": name, "rows": m, "tile": t.__dict__, "us": us, "cublas_us": base,
                                    "rel_err_vs_cublas": err})
                if us < best[0]:
                    best = (us, t)
                print(f"   {t}: {us:6.1f} us ({wbytes / us / 1e6:4.2f} TB/s) x{base / us:4.2f}  err {err:.1e}",
                      flush=True)
            res["best"][f"{name}@{m}"] = {"us": best[0], "cublas_us": base,
                                          "tile": best[1] if isinstance(best[1], str) else best[1].__dict__}
            total.setdefault(m, [0.0, 0.0])
            total[m][0] += base
            total[m][1] += best[0]
            print(f"[{name:7s} M={m:3d}] BEST {best[1]}: {best[0]:.1f} us against cublas {base:.1f}", flush=True)
        del ws, bs
        torch.cuda.empty_cache()
    for m, (b, t) in total.items():
        print(f"M={m}: a layer's projections cublas {b:.1f} us, best triton {t:.1f} us; x36 = {36 * b / 1e3:.2f} "
              f"against {36 * t / 1e3:.2f} ms")
    if a.engine:
        res["engine"] = engine_ab(a.engine)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
