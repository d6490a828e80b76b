"""Vision tower throughput: transformers' forward vs our tower (eager, compiled) on a Qwen2.5-VL-3B-sized tower.

    python bench/tower_bench.py --out bench/results/tower_bench               # GPU: ~2-3 min on an H200
    python bench/tower_bench.py --device cpu --small --out /tmp/tower_smoke   # CPU smoke test (seconds)

The tower is `Qwen2_5_VisionTransformerPretrainedModel` built alone (no LM) with random weights, in bf16 on
CUDA, from the tiny qwen2_5_vl model's vision config (`mmpipe tiny-model`) with Qwen2.5-VL-3B's sizes: depth
32, hidden 1280, intermediate 3420, 16 heads, out_hidden_size 2048, window_size 112, fullatt blocks
[7, 15, 23, 31] (`--model DIR` takes the vision config of a model directory instead, e.g. the one
bench/build_3b_model.py writes; its weights are not read). Inputs are 448x448 images: grid (1, 32, 32) =
1024 patches = 256 LM tokens each.

For batch 1, 8, 16, 64 (`--batches`) it times
  (a) transformers' own forward (`visual(pixel_values, grid_thw)`, sdpa: one SDPA call per window),
  (b) our eager tower (shared/models/towers/qwen_vision.py: one batched SDPA per window length and layer),
  (c) our compiled tower (the token-wise parts through torch.compile, the patch embed as a matmul, CUDA
      graphs for batches up to 16 images), and the same without graphs at batch <= 16 (what the graphs buy),
after warm-up (the compile happens there and is reported), with CUDA events around each call, and reports
img/s, ms per batch and % of the bf16 peak (790 TFLOP/s on H100/H200; matmul FLOPs of the linear layers
plus attention QK^T and PV). In the same run it checks (b) and (c) against (a) and against an fp32 run of
the same weights: max abs difference on a batch of equal images and on a batch of mixed sizes (partial
windows at the edges). Writes <out>.json and
<out>.md and prints progress as it goes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

VISION_3B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                 window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
# --small: every shape rule of the 3B tower (windows of 4x4 units on 448 px, windowed + full blocks), CPU-sized
VISION_SMALL = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                    window_size=112, fullatt_block_indexes=[1, 3])
GRID = (1, 32, 32)  # 448 x 448 px
MIXED = [(1, 32, 32), (1, 20, 28), (1, 46, 46), (1, 16, 40)]  # 448, 280x392, 644, 224x560 px
PEAK_TFLOPS = 790.0
TARGETS = {"img_s_at_16_plus": 250.0, "ms_at_1": 10.0}


def log(*a: Any) -> None:
    print(*a, flush=True)


# ---- the tower ---------------------------------------------------------------------------------------------------
def vision_config(model: str | None, small: bool):
    from transformers import AutoConfig

    if model:
        cfg = AutoConfig.from_pretrained(model).vision_config
    else:
        from mmpipe.shared.models.tiny import build_tiny_model

        with tempfile.TemporaryDirectory() as d:
            cfg = AutoConfig.from_pretrained(build_tiny_model("qwen2_5_vl", Path(d) / "tiny")).vision_config
    for k, v in (VISION_SMALL if small else {} if model else VISION_3B).items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_visual(cfg, device: str, dtype: torch.dtype):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    torch.manual_seed(0)
    with torch.device(device):
        visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, dtype=dtype)
    return visual.eval()


def pixels_for(cfg, grids, device: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), width, generator=g).to(device=device, dtype=dtype)


def flops_per_image(cfg, grid=GRID) -> float:
    """Matmul FLOPs of one image: patch embed, qkv / proj / MLP of every block, merger, attention QK^T + PV."""
    t, h, w = grid
    n, d, inter, m = t * h * w, cfg.hidden_size, cfg.intermediate_size, cfg.spatial_merge_size
    patch_in = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    lin = 2 * n * (patch_in * d + cfg.depth * (4 * d * d + 3 * d * inter))
    units = n // (m * m)
    lin += 2 * units * ((d * m * m) ** 2 + d * m * m * cfg.out_hidden_size)
    vw = cfg.window_size // m // cfg.patch_size
    lh, lw = h // m, w // m
    win = sum((min(vw, lh - r) * min(vw, lw - c) * m * m) ** 2
              for r in range(0, lh, vw) for c in range(0, lw, vw))
    full = len(cfg.fullatt_block_indexes)
    att = 4 * d * t * ((cfg.depth - full) * win + full * (h * w) ** 2)
    return float(lin + att)


# ---- timing ------------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], device: str, *, iters: int, min_s: float) -> list[float]:
    """ms per call: CUDA events around each call on CUDA, perf_counter elsewhere; at least `iters` calls
    and at least `min_s` seconds."""
    out: list[float] = []
    t_end = time.perf_counter() + min_s
    while len(out) < iters or time.perf_counter() < t_end:
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        if len(out) >= 200:
            break
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/tower_bench", help="writes <out>.json and <out>.md")
    ap.add_argument("--model", default=None, help="take the vision config of this model directory (no weights; "
                    "with --small, only its non-size fields)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a CPU-sized tower of the same shape rules")
    ap.add_argument("--batches", default="1,8,16,64")
    ap.add_argument("--iters", type=int, default=5, help="timed calls per point (at least)")
    ap.add_argument("--min-s", type=float, default=0.5, help="timed seconds per point (at least)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-compiled", action="store_true")
    ap.add_argument("--compile-backend", default="inductor", help="aot_eager for a quick CPU smoke test")
    args = ap.parse_args(argv)

    from mmpipe.shared.models.towers.qwen_vision import QwenVisionTower

    t_start = time.perf_counter()
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    batches = [int(b) for b in args.batches.split(",") if b]
    cfg = vision_config(args.model, args.small)
    visual = build_visual(cfg, device, dtype)
    n_params = sum(p.numel() for p in visual.parameters())
    log(f"[tower_bench] {type(visual).__name__}: depth {cfg.depth}, hidden {cfg.hidden_size}, "
        f"{n_params / 1e6:.0f} M params, {dtype}, {device}; torch {torch.__version__}; "
        f"built in {time.perf_counter() - t_start:.1f} s")
    fl = flops_per_image(cfg)
    eager = QwenVisionTower(visual, compile=False)
    methods: dict[str, Callable[[torch.Tensor, list], torch.Tensor]] = {}
    if not args.skip_hf:
        def hf(px, grids):
            with torch.inference_mode():
                return visual(px, grid_thw=torch.tensor(grids, device=device)).pooler_output
        methods["transformers"] = hf
    methods["ours_eager"] = eager
    if not args.skip_compiled:
        compiled = QwenVisionTower(visual, compile=True, compile_backend=args.compile_backend)
        methods["ours_compiled"] = compiled
        if compiled.graphs is not None:  # the same compiled functions without CUDA graphs, small batches only
            no_graphs = QwenVisionTower(visual, compile=True, compile_backend=args.compile_backend, cuda_graphs=False)
            no_graphs.ops = compiled.ops
            methods["ours_compiled_no_graphs"] = no_graphs

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else device,
        "torch": torch.__version__, "dtype": str(dtype), "config": {k: getattr(cfg, k) for k in VISION_3B},
        "grid": GRID, "gflop_per_image": fl / 1e9, "peak_tflops": PEAK_TFLOPS, "points": [], "checks": [],
        "compile_s": None,
    }
    import transformers

    result["transformers"] = transformers.__version__

    # correctness first (this also warms every path up; the compile happens here). Each of ours runs three
    # times, so the compiled tower also captures its CUDA graph (second call) and replays it (third call).
    import copy

    visual32 = copy.deepcopy(visual).float()
    exact32 = QwenVisionTower(visual32, compile=False)
    for name, grids in (("equal", [GRID] * min(8, max(batches))), ("mixed", MIXED)):
        px = pixels_for(cfg, grids, device, dtype, seed=1)
        ref32 = exact32(px.float(), grids)
        outs: dict[str, torch.Tensor] = {}
        if "transformers" in methods:
            outs["transformers"] = methods["transformers"](px, grids)
        for m in methods:
            if m == "transformers":
                continue
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                runs.append(methods[m](px, grids))
                sync(device)
                if m == "ours_compiled" and result["compile_s"] is None:
                    result["compile_s"] = time.perf_counter() - t0
                    log(f"[tower_bench] first compiled call (compiles): {result['compile_s']:.1f} s")
            outs[m] = runs[-1]
            outs[m + "/repeat"] = runs[0]
        for m, out in outs.items():
            if m.endswith("/repeat"):
                continue
            check: dict[str, Any] = {"batch": name, "method": m, "rows": int(out.shape[0]),
                                     "max_abs_diff_fp32": float((out.float() - ref32).abs().max()),
                                     "max_abs_ref": float(ref32.abs().max())}
            if m != "transformers" and "transformers" in outs:
                ref = outs["transformers"]
                diff = (out.float() - ref.float()).abs()
                check.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                             identical=bool(torch.equal(out, ref)))
            if m + "/repeat" in outs:
                check["repeat_identical"] = bool(torch.equal(out, outs[m + "/repeat"]))
            result["checks"].append(check)
            log(f"[tower_bench] check {name:5s} {m:23s} " + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items()
                if k not in ("batch", "method")))
    del visual32, exact32
    if "ours_compiled" in methods:
        result["compiled_fell_back"] = not methods["ours_compiled"].ops.compiled
        g = methods["ours_compiled"].graphs
        result["cuda_graphs"] = None if g is None else {"enabled": g.enabled, "max_rows": g.max_rows}

    for b in batches:
        grids = [GRID] * b
        px = pixels_for(cfg, grids, device, dtype)
        for m, fn in methods.items():
            if m == "ours_compiled_no_graphs" and b * GRID[1] * GRID[2] > methods["ours_compiled"].graphs.max_rows:
                continue
            for _ in range(args.warmup):
                fn(px, grids)
            sync(device)
            ms = time_calls(lambda: fn(px, grids), device, iters=args.iters, min_s=args.min_s)
            med = statistics.median(ms)
            img_s = b / (med / 1e3)
            pt = {"method": m, "batch": b, "ms": med, "ms_min": min(ms), "calls": len(ms), "img_s": img_s,
                  "pct_peak": 100.0 * img_s * fl / (PEAK_TFLOPS * 1e12)}
            result["points"].append(pt)
            log(f"[tower_bench] batch {b:3d} {m:13s} {med:9.2f} ms  {img_s:8.1f} img/s  "
                f"{pt['pct_peak']:5.1f}% of peak  ({len(ms)} calls, {time.perf_counter() - t_start:.0f} s)")
        del px
    result["targets"] = _targets(result["points"])
    result["wall_s"] = time.perf_counter() - t_start
    _write(Path(args.out), result)
    log(f"[tower_bench] done in {result['wall_s']:.0f} s -> {args.out}.json, {args.out}.md")
    return result


def _targets(points: list[dict]) -> dict:
    best = [p for p in points if p["method"] == "ours_compiled"] or [p for p in points if p["method"] == "ours_eager"]
    big = [p["img_s"] for p in best if p["batch"] >= 16]
    one = [p["ms"] for p in best if p["batch"] == 1]
    out: dict[str, Any] = {"method": best[0]["method"] if best else None}
    if big:
        out["img_s_at_16_plus"] = max(big)
        out["img_s_ok"] = max(big) >= TARGETS["img_s_at_16_plus"]
    if one:
        out["ms_at_1"] = one[0]
        out["ms_ok"] = one[0] <= TARGETS["ms_at_1"]
    return out


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    methods = list(dict.fromkeys(p["method"] for p in result["points"]))
    batches = sorted({p["batch"] for p in result["points"]})
    by = {(p["method"], p["batch"]): p for p in result["points"]}
    lines = [f"# Vision tower: transformers vs ours ({result['device']}, {result['dtype']}, torch {result['torch']}, "
             f"transformers {result['transformers']})", "",
             f"Qwen2.5-VL tower {result['config']}, 448x448 images (grid {tuple(result['grid'])}), "
             f"{result['gflop_per_image']:.0f} GFLOP per image; % of a {result['peak_tflops']:.0f} TFLOP/s bf16 peak.",
             "", "| method | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for m in methods:
        cells = []
        for b in batches:
            p = by.get((m, b))
            cells.append("" if p is None else f"{p['img_s']:.0f} img/s, {p['ms']:.1f} ms ({p['pct_peak']:.0f}%)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Targets: >= 250 img/s at batch >= 16, <= 10 ms at batch 1: "
              + json.dumps(result["targets"]), ""]
    if result.get("compile_s") is not None:
        lines.append(f"First compiled call (compilation included): {result['compile_s']:.1f} s"
                     + ("; the compiled path FELL BACK to eager" if result.get("compiled_fell_back") else "") + ".")
    if result.get("cuda_graphs"):
        lines.append(f"ours_compiled replays CUDA graphs up to {result['cuda_graphs']['max_rows']} rows "
                     f"(enabled at the end: {result['cuda_graphs']['enabled']}).")
    lines += ["", "Checks: each output vs transformers (same bf16 weights and inputs) and vs our eager tower in "
              "float32 (the same weights upcast), on 8 equal images and on a mixed batch; `repeat identical`: "
              "the first and the third call agree (the third is a graph replay for ours_compiled).", "",
              "| batch | method | max abs diff vs transformers | mean abs diff | identical | max abs diff vs fp32 "
              "| max abs fp32 | repeat identical |", "|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for c in result["checks"]:
        lines.append(f"| {c['batch']} | {c['method']} | {c.get('max_abs_diff', nan):.3g} | "
                     f"{c.get('mean_abs_diff', nan):.3g} | {c.get('identical', '')} | "
                     f"{c['max_abs_diff_fp32']:.3g} | {c['max_abs_ref']:.3g} | {c.get('repeat_identical', '')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
