"""Prefill attention alone on the GPU, per (chunk length, cached prefix) shape: the previous path (per-sequence
SDPA; gather + boolean mask after a prefix) against the Triton prefill kernel, and which SDPA backends accept
the first-chunk call (is_causal, enable_gqa) in bf16.

For each shape: the first call's wall time (a new shape: plan building, if any), then the steady host time per
call (no sync) and GPU time per call (events over 20 calls). Shapes of a 3B model: 16 q / 2 kv heads, head 128.

    python bench/prefill_attn_probe.py --out bench/results/prefill_attn_probe.json
    python bench/prefill_attn_probe.py --skip-old --tiles 64x64w4s2,128x64w8s3,128x32w4s3 --out ...
    python bench/prefill_attn_probe.py --skip-old --splits 1,2,4,8 --out ...   # key splits per query block

`--splits` times the kernel with each fixed number of key splits per query block ("triton" itself uses the
engine's choice, `choose_prefill_splits` on this GPU's SM count).

`--tiles` times the Triton kernel at each (BLOCK_M x BLOCK_N, warps, stages) tile against the default one.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmpipe.shared.engine.attention.torch_ref import attend_one
from mmpipe.shared.engine.kernels.triton_prefill import (choose_prefill_splits, prefill_attention, prefill_block_m,
                                                          prefill_work)

SHAPES = [(1000, 0), (2048, 0), (731, 0), (500, 500), (1000, 1000), (137, 863), (731, 269), (389, 611),
          (1523, 477), (64, 936), (104, 896), (104, 992), (256, 0), (512, 512)]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=36, help="only scales the per-step estimate")
    ap.add_argument("--tiles", default="", help="Triton tiles to compare, e.g. 64x64w4s2,128x64w8s3")
    ap.add_argument("--skip-old", action="store_true", help="skip the previous SDPA path")
    ap.add_argument("--shapes", default="", help="chunk x cached prefix shapes to run, e.g. 104x896,256x0")
    ap.add_argument("--splits", default="", help="fixed key splits per query block to compare, e.g. 1,2,4,8")
    args = ap.parse_args(argv)
    H, KVH, D, page = args.heads, args.kv_heads, args.head_dim, 16
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    nb = 600
    kc = torch.randn(nb, page, KVH, D, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    scale = D ** -0.5
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": [], "backends": {}}

    # which SDPA backends take the first-chunk call (what attend_one does when n == ctx)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, H, 1000, D, device=dev, dtype=dt)
    k = torch.randn(1, KVH, 1000, D, device=dev, dtype=dt)
    v = torch.randn_like(k)
    backends = () if args.skip_old else (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                         SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
    for b in backends:
        for gqa in (True, False):
            kk, vv = (k, v) if gqa else (k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1))
            try:
                with sdpa_kernel(b):
                    F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa)
                    torch.cuda.synchronize()
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    for _ in range(20):
                        F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa)
                    e1.record()
                    torch.cuda.synchronize()
                r = f"ok {e0.elapsed_time(e1) / 20 * 1e3:.1f} us"
            except Exception as e:  # noqa: BLE001
                r = f"refused: {str(e).splitlines()[0][:100]}"
            res["backends"][f"{b.name} enable_gqa={gqa}"] = r
            print(f"[sdpa first chunk 1000, bf16] {b.name:20s} enable_gqa={gqa}: {r}", flush=True)

    perm = torch.randperm(nb, device=dev)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = [tuple(int(v) for v in x.split("x")) for x in args.shapes.split(",") if x] or SHAPES
    for n, pre in shapes:
        ctx = n + pre
        nblk = -(-ctx // page)
        table = perm[:nblk].to(torch.int32)
        qkv = torch.randn(n, (H + 2 * KVH) * D, device=dev, dtype=dt)
        q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
        q, k, v = q.view(n, H, D), k.view(n, KVH, D), v.view(n, KVH, D)
        # the chunk's own k / v go into the cache too (as rope_and_cache does)
        slots = (table.long()[torch.arange(pre, ctx, device=dev) // page] * page + torch.arange(pre, ctx, device=dev) % page)
        kc.view(-1, KVH, D)[slots] = k
        vc.view(-1, KVH, D)[slots] = v
        bt = table[None]
        sl = torch.tensor([ctx], dtype=torch.int32, device=dev)
        qsl = torch.tensor([0, n], dtype=torch.int32, device=dev)

        def old():
            if pre == 0:
                kk, vv = k, v
            else:
                blocks = bt[0, :nblk].long()
                kk = kc.index_select(0, blocks).flatten(0, 1)[:ctx]
                vv = vc.index_select(0, blocks).flatten(0, 1)[:ctx]
            return attend_one(q, kk, vv, scale)

        def triton_fn(tile=None, splits=None):
            work = tuple(torch.tensor(w, dtype=torch.int32, device=dev)
                         for w in prefill_work([n], tile[0] if tile else prefill_block_m(q.dtype)))
            if splits is None:  # the engine's choice (attention/triton_paged.py)
                splits = choose_prefill_splits(work[0].shape[0], H, sms)
            return lambda: prefill_attention(q, k, v, kc, vc, bt, sl, qsl, work, scale, tile=tile,
                                             num_splits=splits)

        variants = ([] if args.skip_old else [("sdpa_old", old)]) + [("triton", triton_fn())]
        for spec in [x for x in args.tiles.split(",") if x]:
            bm, rest = spec.split("x")
            bn, rest = rest.split("w")
            warps, stages = rest.split("s")
            variants.append((f"triton_{spec}", triton_fn((int(bm), int(bn), int(warps), int(stages)))))
        for sp in [int(x) for x in args.splits.split(",") if x]:
            variants.append((f"triton_splits{sp}", triton_fn(splits=sp)))

        row = {"n": n, "prefix": pre}
        ref = None
        for name, fn in variants:
            torch.cuda.synchronize()
            t = time.perf_counter()
            o = fn()
            torch.cuda.synchronize()
            first = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(20):
                fn()
            host = (time.perf_counter() - t) / 20
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(20):
                fn()
            e1.record()
            torch.cuda.synchronize()
            gpu = e0.elapsed_time(e1) / 20
            # the same call replayed from a CUDA graph, as the engine's mixed steps run it: no launch gaps, so a
            # short kernel is timed by itself (back-to-back eager calls of a ~10 us kernel time the launches)
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                graph.replay()
                torch.cuda.synchronize()
                e0.record()
                for _ in range(20):
                    graph.replay()
                e1.record()
                torch.cuda.synchronize()
                replay = e0.elapsed_time(e1) / 20
            except RuntimeError as e:  # the old path's plan building may refuse capture
                print(f"[attn n={n:5d} prefix={pre:5d}] {name}: no graph replay ({str(e).splitlines()[0][:80]})")
                replay = float("nan")
            if ref is None:
                ref = attend_one(q.float(), *(x.float() for x in (
                    (kc.index_select(0, bt[0].long()).flatten(0, 1)[:ctx], vc.index_select(0, bt[0].long()).flatten(0, 1)[:ctx]))), scale)
            err = ((o.float() - ref).norm() / ref.norm()).item()
            flops = 4 * n * (pre + (n + 1) / 2) * D * H
            row[name] = dict(first_call_ms=1e3 * first, host_us=1e6 * host, gpu_us=1e3 * gpu,
                             graph_us=1e3 * replay, rel_err=err,
                             tflops=flops / (gpu * 1e-3) / 1e12, per_step_ms_x_layers=gpu * args.layers)
            print(f"[attn n={n:5d} prefix={pre:5d}] {name:18s} first call {1e3 * first:8.2f} ms, host {1e6 * host:7.1f} us/call,"
                  f" GPU {1e3 * gpu:7.1f} us/call, graph replay {1e3 * replay:7.1f} us ({flops / (replay * 1e-3) / 1e12:5.1f} "
                  f"TFLOP/s), x{args.layers} layers {replay * args.layers:6.2f} ms, rel err vs fp32 {err:.2e}",
                  flush=True)
        res["shapes"].append(row)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
