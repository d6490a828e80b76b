"""Where the GPU time of a cached chat turn goes, kernel by kernel (issue 12's TTFT target, on the GPU).

    python bench/cached_turn_kernels.py --out bench/results/cached_turn_kernels_h200     # the 3B-sized model

bench/prefix_cache_bench.py's 3-turn conversation (one 448 px image, a ~1,000-token history by turn 3; each
conversation over its own image, turn 1 encodes it and is not counted), on offline `LLM`s over the same model:
the prefix cache on with the prefill kernel's key splits capped at each --max-splits value (the engine
chooses within the cap; 1 is one program per query block, the kernel before the splits), and the cache off. For each: the median
wall time of turn 2 (`LLM.chat(max_tokens=1)`, the TTFT) over --repeats conversations, then one more turn 2
under torch.profiler, whose CUDA kernels (CUDA-graph replays included) are summed by name: the GPU time of the
turn, the kernels that take it, and the host time the GPU sat idle.

Bounded: --repeats conversations a variant; writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def kernel_table(prof) -> tuple[float, float, list[tuple[str, float, int]]]:
    """(total GPU kernel us, the graph replay's span us (busy_run), [(kernel name, us, calls)] by time) of one
    profiled region."""
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    spans = []
    for e in prof.events():
        if e.device_type.name == "CUDA":
            rec = per[e.name]
            rec[0] += e.device_time
            rec[1] += 1
            spans.append((e.time_range.start, e.time_range.end))
    rows = sorted(((n, t, int(c)) for n, (t, c) in per.items()), key=lambda r: -r[1])
    return sum(t for _, t, _ in rows), busy_run(spans), rows


def busy_run(spans: list[tuple[float, float]], max_gap_us: float = 20.0) -> float:
    """us from start to end of the longest run of kernels none of which waits over max_gap_us for the one before:
    the step's CUDA-graph replay with its in-graph launch gaps, without the host time (slowed by the profiler)
    between the eager kernels before it."""
    best, start, end = 0.0, None, None
    for s, e in sorted(spans):
        if start is None or s - end > max_gap_us:
            start, end = s, e
        else:
            end = max(end, e)
        best = max(best, end - start)
    return best


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import prefix_cache_bench as pcb
    from mmpipe import LLM
    from transformers.utils.logging import disable_progress_bar

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=pcb.DEFAULT_3B_DIR)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--history-tokens", type=int, default=1000)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="conversations timed per variant")
    p.add_argument("--top", type=int, default=14, help="kernels listed per variant")
    p.add_argument("--max-splits", default="8,4,1", type=lambda v: [int(x) for x in v.split(",")],
                   help="cache-on variants: most key splits per prefill query block (1: one program a block)")
    p.add_argument("--no-prefill-graphs-ab", action="store_true",
                   help="also the first cap without the prefill-only CUDA graphs (mixed graphs with decode rows)")
    p.add_argument("--out", default="/tmp/cached_turn_kernels")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the harness (the tiny model, no kernels)")
    a = p.parse_args(argv)
    disable_progress_bar()
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    if a.device == "cpu":
        from mmpipe.shared.models.tiny import ensure_tiny_model

        a.model = str(ensure_tiny_model("qwen2_5_vl"))
    elif not Path(a.model).exists():
        import build_3b_model

        build_3b_model.main([a.model])
    from mmpipe.shared.engine.attention.triton_paged import TritonPagedBackend

    # (name, prefix cache, most key splits per prefill query block); the splits are fixed when an engine
    # captures its CUDA graphs, so each variant is an LLM of its own. gpu_memory_utilization caps the whole GPU
    # (vLLM's meaning): each LLM's cap includes the earlier ones' shares.
    # --no-prefill-graphs-ab adds the first cap again with the runner's prefill-only graphs dropped (such steps
    # then run as mixed graphs, decode rows and all, as before those graphs existed)
    variants = [(f"cache on, key splits <= {n}", "on", n, True) for n in a.max_splits]
    if a.no_prefill_graphs_ab:
        variants.append((f"cache on, key splits <= {a.max_splits[0]}, no prefill-only graphs", "on",
                         a.max_splits[0], False))
    variants.append(("cache off", "off", 8, True))
    llms = {}
    for i, (name, side, splits, prefill_graphs) in enumerate(variants):
        TritonPagedBackend.prefill_max_splits = splits
        llms[name] = LLM(a.model, device=a.device, enable_prefix_caching=side == "on", max_model_len=4096,
                         gpu_memory_utilization=min(0.9, 0.18 * (i + 1)))
        if not prefill_graphs:
            llms[name].engine.runner.prefill_graphs = None
    TritonPagedBackend.prefill_max_splits = 8
    ns = argparse.Namespace(answer_tokens=a.answer_tokens, image_size=a.image_size, history_tokens=a.history_tokens)
    context, answer = pcb.calibrate_context(llms["cache off"], ns)
    res: dict = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
                 "variants": {}}
    seed = 0
    for name, *_ in variants:
        llm = llms[name]
        walls, info = [], None
        for r in range(2 + a.repeats + 1):  # two warm-ups, the timed ones, one profiled
            seed += 1
            turns = pcb.conversation(seed, pcb.image(2000 + seed, a.image_size), context, answer)
            pcb.timed_chat(llm, turns[0])
            sync()
            if r < 2 + a.repeats:
                dt, outs = pcb.timed_chat(llm, turns[1])
                if r >= 2:
                    walls.append(dt * 1e3)
                    info = (len(outs[0].prompt_token_ids), outs[0].num_cached_tokens)
                continue
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t = time.perf_counter()
                pcb.timed_chat(llm, turns[1])
                sync()
                prof_wall = (time.perf_counter() - t) * 1e3
        gpu_us, span_us, rows = kernel_table(prof)
        v = {"ttft_ms_median": statistics.median(walls), "ttft_ms": walls, "prompt_tokens": info[0],
             "cached_tokens": info[1], "profiled_wall_ms": prof_wall, "gpu_kernel_ms": gpu_us / 1e3,
             "gpu_span_ms": span_us / 1e3, "kernels": [{"name": n, "us": t, "calls": c} for n, t, c in rows[:40]]}
        v["host_ms"] = v["ttft_ms_median"] - v["gpu_span_ms"]  # the turn less its step's replay: host work
        res["variants"][name] = v
        print(f"\n## {name}: TTFT median {v['ttft_ms_median']:.2f} ms ({info[0]} prompt tokens, {info[1]} cached); "
              f"profiled turn: wall {prof_wall:.2f} ms, GPU kernels {gpu_us / 1e3:.2f} ms over a span of "
              f"{span_us / 1e3:.2f} ms (the TTFT less that span: {v['host_ms']:.2f} ms)", flush=True)
        for n, t, c in rows[:a.top]:
            print(f"  {t:9.1f} us {c:5d}x  {n[:110]}")
    on, off = (res["variants"][variants[i][0]]["ttft_ms_median"] for i in (0, -1))
    res["on_over_off"] = on / off
    print(f"\nTTFT turn 2, cache on / off: {on:.2f} / {off:.2f} ms = {on / off:.3f} (target <= 0.30)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(res, indent=1))
    md = [f"# Cached-turn kernels, {res['device']}", "",
          "| variant | TTFT ms | GPU kernels ms | GPU span ms | TTFT less span ms | top kernel |",
          "|---|---:|---:|---:|---:|---|"]
    for name, v in res["variants"].items():
        top = v["kernels"][0] if v["kernels"] else {"name": "-", "us": 0.0}
        md.append(f"| {name} | {v['ttft_ms_median']:.2f} | {v['gpu_kernel_ms']:.2f} | {v['gpu_span_ms']:.2f} | "
                  f"{v['host_ms']:.2f} | {top['name'][:60]} "
                  f"({top['us']:.0f} us) |")
    Path(a.out + ".md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
