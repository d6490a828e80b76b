"""Engine in the generator's process vs in its own process: N concurrent streams through GeneratorCore.

    # GPU (the lead's run): a Qwen2.5-VL-3B-sized model dir with random bf16 weights (FACTS "The GPU machines")
    python bench/engine_process_bench.py --model /tmp/qwen2_5_vl_3b --concurrency 64,128 --max-tokens 64
    # CPU smoke test on a tiny model (one OpenMP thread per process: two processes spinning two threads each
    # on a 2-core machine measure the oversubscription, not the engine)
    mmpipe tiny-model qwen2_5_vl /tmp/tiny_qwen2_5_vl
    OMP_NUM_THREADS=1 python bench/engine_process_bench.py --device cpu --model /tmp/tiny_qwen2_5_vl --concurrency 4,8 \
        --max-tokens 8 --image-tokens 16 --rounds 2

Each mode builds the generator exactly as the service does (services/generator/engine_setup.build_engine:
`engine_process=True` spawns the engine-core process and keeps a weightless adapter here; False loads the LM
here and steps it in a thread) and wraps it in the service's GeneratorCore, with an in-process embedding cache
standing in for Redis. Every request is what the gateway sends: distinct random prompt ids with one image
placeholder, and a key to a distinct random `--image-tokens` x hidden embedding, so the front does the
service's per-request work (cache read, placeholder expansion, M-RoPE positions, EngineRequest) and its
per-token work (GeneratorCore's stream loop, TokenChunk -> protobuf bytes, as the servicer does); only the
gRPC transport itself is left out. Each mode builds the engine once, sized for the largest concurrency. All N
requests start together; a round ends when all have their `--max-tokens` tokens (EOS ignored); `--rounds`
rounds per concurrency (after one short warm-up round), no new round after `--max-seconds`.

Reported per mode and concurrency: TPOT p50 / p99 over requests ((last token - first token) / (tokens - 1)),
TTFT p50 / p99, and output tokens/s (all tokens / wall time of the round).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass
class RequestTiming:
    ttft_s: float
    tpot_s: float
    tokens: int


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] if s else float("nan")


def _generator_config(a: argparse.Namespace, engine_process: bool, concurrency: int):
    from mmpipe.services.generator.config import GeneratorConfig

    return GeneratorConfig(model=a.model, redis_url="", device=a.device, dtype=a.dtype,
                           max_num_seqs=max(concurrency, 1), max_num_batched_tokens=a.max_num_batched_tokens,
                           kv_cache_blocks=a.kv_cache_blocks, gpu_memory_utilization=a.gpu_memory_utilization,
                           enforce_eager=a.enforce_eager, max_waiting=100_000, engine_process=engine_process)


def _image_embedding(adapter, rows: int, seed: int):
    """One random image embedding with the meta the adapter's M-RoPE positions need (a square grid)."""
    import torch

    from mmpipe.shared.types import MMEmbedding

    side = int(math.isqrt(rows))
    if side * side != rows:
        raise SystemExit(f"--image-tokens must be a square number, got {rows}")
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(rows, adapter.hidden_size, generator=g) * 0.02).to(torch.bfloat16)
    meta: dict = {"num_tokens": rows}
    merge = getattr(adapter, "merge_size", None)
    if merge is not None:
        meta["grid_thw"] = [1, side * merge, side * merge]
    return MMEmbedding(modality="image", tensor=t, meta=meta)


def _requests(adapter, cache, n: int, round_no: int, a: argparse.Namespace):
    """n gateway-style requests: (request id, prompt ids with one image placeholder, [EmbeddingRef])."""
    import random

    from mmpipe.services.common.convert import EmbeddingRef

    rng = random.Random(1000 * round_no + n)
    pid = adapter.placeholder_id("image")
    vocab = min(int(adapter.text_config.vocab_size), len(adapter.tokenizer))
    specials = set(adapter.placeholder_ids().values()) | set(adapter.tokenizer.all_special_ids)
    text_ids = [t for t in range(vocab) if t not in specials]
    out = []
    for i in range(n):
        rid = f"r{round_no}-{n}-{i}"
        emb = _image_embedding(adapter, a.image_tokens, seed=zlib.crc32(rid.encode()))
        key = f"bench:image:{rid}"
        cache.put(key, emb)
        ids = [rng.choice(text_ids) for _ in range(a.prompt_tokens)]
        ids.insert(len(ids) // 2, pid)
        ref = EmbeddingRef(key=key, modality="image", num_tokens=a.image_tokens, meta=dict(emb.meta))
        out.append((rid, ids, [ref]))
    return out


async def _one(core, rid: str, ids: list[int], refs: list, sampling, t0: float) -> RequestTiming:
    first = last = None
    n = 0
    async for chunk in core.generate(rid, ids, refs, sampling):
        chunk.to_pb().SerializeToString()  # what the servicer does with every chunk
        if chunk.token_ids:
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
            n += len(chunk.token_ids)
    tpot = (last - first) / (n - 1) if n > 1 else float("nan")
    return RequestTiming(first - t0, tpot, n)


async def _run_mode(a: argparse.Namespace, engine_process: bool, concurrencies: list[int]) -> list[dict]:
    """Build the generator once (sized for the largest concurrency) and run every concurrency on it."""
    from mmpipe.services.common.metrics import ServiceMetrics
    from mmpipe.services.generator.core import GeneratorCore
    from mmpipe.services.generator.engine_setup import build_engine
    from mmpipe.shared.cache.lru import LRUEmbeddingCache
    from mmpipe.shared.types import SamplingParams

    cfg = _generator_config(a, engine_process, max(concurrencies))
    t_load = time.perf_counter()
    built = await asyncio.get_running_loop().run_in_executor(None, build_engine, cfg)
    cache = LRUEmbeddingCache(max_bytes=64 << 30)
    core = GeneratorCore(cfg, built.adapter, built.engine, cache, ServiceMetrics("generator", a.model))
    await core.warmup()
    load_s = time.perf_counter() - t_load
    sampling = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    results = []
    for concurrency in concurrencies:
        warm = _requests(built.adapter, cache, concurrency, -1, a)  # prefill shapes, allocator, Triton JIT
        await asyncio.gather(*(_one(core, rid, ids, refs, short, time.perf_counter()) for rid, ids, refs in warm))
        rounds, timings = [], []
        t_start = time.perf_counter()
        for r in range(a.rounds):
            reqs = _requests(built.adapter, cache, concurrency, r, a)
            t0 = time.perf_counter()
            got = await asyncio.gather(*(_one(core, rid, ids, refs, sampling, t0) for rid, ids, refs in reqs))
            wall = time.perf_counter() - t0
            timings += got
            rounds.append({"wall_s": wall, "tokens": sum(g.tokens for g in got)})
            cache.clear()
            if time.perf_counter() - t_start > a.max_seconds:
                break
        tpots = [g.tpot_s for g in timings if not math.isnan(g.tpot_s)]
        ttfts = [g.ttft_s for g in timings]
        toks = sum(r["tokens"] for r in rounds)
        wall = sum(r["wall_s"] for r in rounds)
        res = {"mode": "engine-process" if engine_process else "in-process", "concurrency": concurrency,
               "rounds": len(rounds), "requests": len(timings), "load_s": round(load_s, 1),
               "tpot_p50_ms": _pct(tpots, 0.5) * 1e3, "tpot_p99_ms": _pct(tpots, 0.99) * 1e3,
               "ttft_p50_ms": _pct(ttfts, 0.5) * 1e3, "ttft_p99_ms": _pct(ttfts, 0.99) * 1e3,
               "tokens_per_s": toks / wall if wall else float("nan")}
        print(json.dumps(res), flush=True)
        results.append(res)
    await core.close()
    return results


def _release_gpu_memory() -> None:
    """The in-process engine's weights, KV cache and graph pool go before the next mode sizes its KV cache."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (e.g. a Qwen2.5-VL-3B-sized random model)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--modes", default="engine-process,in-process")
    p.add_argument("--concurrency", default="64,128", help="comma-separated numbers of concurrent streams")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64, help="text tokens per prompt (plus the image)")
    p.add_argument("--image-tokens", type=int, default=256, help="embedding rows of the one image per prompt")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=120.0, help="no new round after this long, per run")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--kv-cache-blocks", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = set(modes) - {"engine-process", "in-process"}
    if bad:
        raise SystemExit(f"unknown modes {sorted(bad)}")
    concurrencies = [int(x) for x in a.concurrency.split(",")]
    results = []
    for m in modes:
        results += asyncio.run(_run_mode(a, m == "engine-process", concurrencies))
        _release_gpu_memory()
    print(f"\n| mode | streams | TPOT p50 ms | TPOT p99 ms | TTFT p50 ms | tokens/s |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['concurrency']} | {r['tpot_p50_ms']:.2f} | {r['tpot_p99_ms']:.2f} | "
              f"{r['ttft_p50_ms']:.1f} | {r['tokens_per_s']:.0f} |")
    if a.out is not None:
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
