"""Probe: the decode projections of the 3B model at batch 1-8, cuBLAS (F.linear) vs the Triton skinny GEMM
(shared/engine/kernels/triton_gemv.py) over a few tile configs. Each timing cycles through 24 weight copies
inside one CUDA graph, so the weights come from HBM as in a real step (one 8 MB matrix would sit in L2).

    python bench/engine_gemv_probe.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"qkv": (2560, 2048, True), "o_proj": (2048, 2048, False), "gate_up": (22016, 2048, False),
          "down": (2048, 11008, False)}
CONFIGS = [(16, 128, 4, 6), (16, 256, 4, 4), (16, 512, 8, 3), (32, 256, 4, 4), (32, 128, 4, 6), (64, 128, 4, 4),
           (32, 512, 8, 3)]


def main(argv=None):
    import triton

    from mmpipe.shared.engine.kernels.triton_gemv import skinny_linear

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--copies", type=int, default=24)
    args = ap.parse_args(argv)
    dev, dt = "cuda", torch.bfloat16
    res = {"device": torch.cuda.get_device_name(), "rows": []}
    x_ = torch.empty(2 ** 31, dtype=torch.uint8, device=dev)
    y_ = torch.empty_like(x_)
    bw = triton.testing.do_bench(lambda: y_.copy_(x_), return_mode="median") * 1e-3
    bw = 2 * x_.numel() / bw
    del x_, y_
    res["copy_bw"] = bw
    print(f"{res['device']}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    for name, (N, K, bias) in SHAPES.items():
        ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(args.copies)]
        bs = [torch.randn(N, device=dev, dtype=dt) * 0.02 for _ in range(args.copies)] if bias else [None] * len(ws)
        nbytes = N * K * 2
        for B in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(B, K, device=dev, dtype=dt)
            ref = F.linear(x.float(), ws[0].float(), bs[0].float() if bias else None)

            def run_cublas():
                for w, b in zip(ws, bs):
                    F.linear(x, w, b)
            t_cub = triton.testing.do_bench_cudagraph(run_cublas, rep=50, return_mode="median") / len(ws)
            row = dict(name=name, N=N, K=K, B=B, cublas_us=1e3 * t_cub, cublas_frac=nbytes / (t_cub * 1e-3) / bw)
            best = None
            for cfg in CONFIGS:
                bn, bk, nw, ns = cfg
                try:
                    got = skinny_linear(x, ws[0], bs[0], bn, bk, nw, ns)
                    err = ((got.float() - ref).norm() / ref.norm()).item()

                    def run_triton(cfg=cfg):
                        for w, b in zip(ws, bs):
                            skinny_linear(x, w, b, *cfg)
                    t = triton.testing.do_bench_cudagraph(run_triton, rep=50, return_mode="median") / len(ws)
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} B={B} cfg {cfg} failed: {e!r}", flush=True)
                    continue
                row[f"triton_{bn}_{bk}_{nw}_{ns}_us"] = 1e3 * t
                if best is None or t < best[0]:
                    best = (t, cfg, err)
            if best:
                row.update(triton_best_us=1e3 * best[0], triton_best_cfg=best[1], triton_rel_err=best[2],
                           triton_frac=nbytes / (best[0] * 1e-3) / bw)
            res["rows"].append(row)
            print(f"{name:8s} B={B}: cuBLAS {row['cublas_us']:7.2f} us ({100 * row['cublas_frac']:.0f}% of copy bw)"
                  + (f", triton best {row['triton_best_us']:7.2f} us ({100 * row['triton_frac']:.0f}%) cfg "
                     f"{best[1]} rel err {best[2]:.1e}" if best else ""), flush=True)
        del ws, bs
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
