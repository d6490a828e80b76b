"""Probe: the two launch-removing fusions of the batch-1 decode step, each against the path it replaces, timed
inside CUDA graphs (triton.testing.do_bench_cudagraph) over one copy per layer (36, as the 3B model has), so
weights and KV come from HBM and every layer is its own launch, as in a real step:

- attention: paged_decode with the split merge fused into the decode kernel vs the separate merge kernel
  (H=16, KVH=2, D=128, page 16, seq_len 1000, splits from choose_num_splits with the device's SM count);
- MLP: the short-step GEMM with silu(gate) * up fused (one launch, triton_gemm.short_gate_up_silu) vs cuBLAS's
  F.linear + silu_mul (two), K=2048, I=11008, bf16, over a few tiles of the fused kernel (the first is the one
  TritonOps uses at that batch).

    python bench/decode_fusion_probe.py [--out results.json] [--batches 1,4] [--layers 36]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (block_n, block_k, num_warps, num_stages) tried after the engine's own tile for the batch
GATE_UP_CONFIGS = [(32, 128, 4, 3), (64, 64, 4, 4), (64, 128, 8, 3)]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _time_us(fn, layers: int) -> float:
    """Median time of one layer's call, from a graph of all layers' calls."""
    import triton

    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") / layers


def probe_attention(batch: int, layers: int, sms: int, seq_len: int = 1000, heads: int = 16, kv_heads: int = 2,
                    head_dim: int = 128, page: int = 16) -> dict:
    from mmpipe.shared.engine.kernels.triton_attention import choose_num_splits, paged_decode

    dev, dt = "cuda", torch.bfloat16
    splits = choose_num_splits(batch, kv_heads, sms)
    nblk = -(-seq_len // page) * batch
    caches = [(torch.randn(nblk, page, kv_heads, head_dim, device=dev, dtype=dt),
               torch.randn(nblk, page, kv_heads, head_dim, device=dev, dtype=dt)) for _ in range(layers)]
    bt = torch.randperm(nblk, device=dev).to(torch.int32).view(batch, -1)
    sl = torch.full((batch,), seq_len, dtype=torch.int32, device=dev)
    q = torch.randn(batch, heads, head_dim, device=dev, dtype=dt)
    outs = [torch.empty_like(q) for _ in range(layers)]
    scale = head_dim ** -0.5

    def run(fused: bool):
        for (kc, vc), o in zip(caches, outs):
            paged_decode(q, kc, vc, bt, sl, scale, splits, out=o, fused_merge=fused)

    fused_out = paged_decode(q, *caches[0], bt, sl, scale, splits, fused_merge=True)
    ref = paged_decode(q, *caches[0], bt, sl, scale, splits, fused_merge=False)
    return dict(kernel="paged_decode", batch=batch, splits=splits, seq_len=seq_len, rel_err=_rel(fused_out, ref),
                two_kernel_us=_time_us(lambda: run(False), layers), fused_us=_time_us(lambda: run(True), layers))


def probe_gate_up(batch: int, layers: int, K: int = 2048, inter: int = 11008) -> dict:
    from mmpipe.shared.engine.kernels.triton_fused import silu_mul
    from mmpipe.shared.engine.kernels.triton_gemm import GemmTile, short_gate_up_silu
    from mmpipe.shared.engine.kernels.triton_ops import short_gate_up_tile

    dev, dt = "cuda", torch.bfloat16
    ws = [torch.randn(2 * inter, K, device=dev, dtype=dt) * K ** -0.5 for _ in range(layers)]
    x = torch.randn(batch, K, device=dev, dtype=dt)

    def unfused(w):
        gu = torch.nn.functional.linear(x, w)
        return silu_mul(gu[:, :inter], gu[:, inter:])

    engine = short_gate_up_tile(batch)
    tiles = [engine] + [GemmTile(block_n=n, block_k=k, num_warps=nw, num_stages=ns)
                        for n, k, nw, ns in GATE_UP_CONFIGS]
    ref = unfused(ws[0])
    got = short_gate_up_silu(x, ws[0], engine)
    row = dict(kernel="gate_up_silu", batch=batch, K=K, I=inter, rel_err=_rel(got, ref),
               unequal=(got != ref).float().mean().item(),
               unfused_us=_time_us(lambda: [unfused(w) for w in ws], layers), fused_tiles_us={})
    def name(t: GemmTile) -> str:
        return f"{t.block_n}_{t.block_k}_{t.num_warps}_{t.num_stages}"

    for t in tiles:
        row["fused_tiles_us"][name(t)] = _time_us(lambda t=t: [short_gate_up_silu(x, w, t) for w in ws], layers)
    row["fused_us"] = row["fused_tiles_us"][name(engine)]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--sms", type=int, default=None, help="SM count for choose_num_splits (default: the device's)")
    args = ap.parse_args(argv)
    sms = args.sms or torch.cuda.get_device_properties(0).multi_processor_count
    res = {"device": torch.cuda.get_device_name(), "sms": sms, "layers": args.layers, "rows": []}
    print(f"{res['device']}, {sms} SMs, {args.layers} layers per graph; times per layer (median)", flush=True)
    print(f"{'kernel':14s} {'B':>3s} {'before us':>10s} {'after us':>9s} {'saved/step us':>14s}  notes", flush=True)
    from mmpipe.shared.engine.kernels.triton_ops import TritonOps

    for B in [int(b) for b in args.batches.split(",")]:
        a = probe_attention(B, args.layers, sms)
        probes = [(a, a["two_kernel_us"], f"splits {a['splits']}, rel err {a['rel_err']:.1e}")]
        if B <= TritonOps.short_gemm_max_rows:  # larger batches take cuBLAS for gate/up: nothing fused
            g = probe_gate_up(B, args.layers)
            tiles = ", ".join(f"{k} {v:.2f}" for k, v in g["fused_tiles_us"].items())
            probes.append((g, g["unfused_us"], f"rel err {g['rel_err']:.1e}, {100 * g['unequal']:.2f}% of outputs "
                                               f"differ; tiles (block_n_block_k_warps_stages) us: {tiles}"))
        res["rows"] += [p[0] for p in probes]
        for row, before, note in probes:
            print(f"{row['kernel']:14s} {B:3d} {before:10.2f} {row['fused_us']:9.2f} "
                  f"{args.layers * (before - row['fused_us']):14.1f}  {note}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
