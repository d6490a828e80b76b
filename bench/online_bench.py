"""Online serving benchmark: Poisson arrivals through mmpipe's AsyncLLMEngine vs a static-batching server built
on transformers `generate`, plus the bf16 greedy agreement of the engine with transformers `generate`.

    python bench/online_bench.py --out bench/results/online_bench            # GPU: everything below
    python bench/online_bench.py --out /tmp/ob --tiny --device cpu ...       # CPU dry run of the code paths

One process, one GPU, the model of bench/engine_bench.py (a Qwen2.5-VL-3B-sized text model with random bf16
weights); every request is a ~1,000-token prompt carrying one image's embedding rows (256 rows, M-RoPE
positions) and generates exactly --new-tokens tokens (ignore_eos, greedy).

Sections (each can be skipped; results are written after each one, so a time-out loses nothing):
  agreement  bf16 greedy tokens of LLMEngine vs `Qwen2ForCausalLM.generate(inputs_embeds=...)` on the same
             prompts (token embeddings with the image rows written in, 1-D positions): leading tokens that
             agree per prompt (median, min) and the fraction of all positions that agree.
  mmpipe     for each rate in --rates: requests arrive as a Poisson process for --duration seconds and are
             streamed through `AsyncLLMEngine.generate`; TTFT = first token - arrival, TPOT = (last token -
             first token) / (tokens - 1) per request, both at p50 and p99; ITL p99 over all token gaps.
  baseline   the same arrivals served by a loop that takes whatever is waiting (up to --baseline-max-batch),
             runs `generate` on that static batch to completion, and repeats; token times come from a logits
             processor that stamps every step. Variants (--baseline-variants): "dynamic" = default cache;
             "compiled" = static cache + torch.compile(mode="reduce-overhead", fullgraph=True), each batch padded
             to --baseline-max-batch rows so that one compiled graph serves every batch (no recompiles).

A rate is SUSTAINED when (1) p99 TPOT < --tpot-slo-ms, (2) every request finished before the drain limit
(--drain seconds after the last arrival), and (3) the queue did not grow: the median TTFT of the last third of
the arrivals exceeds that of the first third by less than --ttft-growth-s. ((1) alone is met by an overloaded
server too: a static batch or a full running batch decodes at the same speed however long the queue is; only
TTFT shows the overload.) The report gives the highest sustained rate of each system and their ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine_bench as eb  # noqa: E402

log = eb.log


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def poisson_times(rate: float, duration: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append(t)


def summarize(recs: list[dict], rate: float, duration: float, args) -> dict:
    """recs: per request arrival, first, last (perf_counter seconds), n tokens, itls; None fields if unfinished."""
    done = [r for r in recs if r.get("last") is not None and r["n"] == args.new_tokens]
    ttft = [r["first"] - r["arrival"] for r in done]
    tpot = [(r["last"] - r["first"]) / (r["n"] - 1) for r in done if r["n"] > 1]
    itl = [x for r in done for x in r.get("itls", [])]
    third = max(1, len(recs) // 3)
    by_arrival = sorted(recs, key=lambda r: r["arrival"])

    def med_ttft(rs):
        v = [r["first"] - r["arrival"] for r in rs if r.get("first") is not None]
        return statistics.median(v) if v else float("inf")

    growth = med_ttft(by_arrival[-third:]) - med_ttft(by_arrival[:third]) if recs else 0.0
    t0 = min((r["arrival"] for r in recs), default=0.0)
    t_end = max((r["last"] for r in done), default=t0)
    out_tok = sum(r["n"] for r in done)
    s = dict(rate=rate, duration_s=duration, requests=len(recs), finished=len(done),
             ttft_p50_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99), tpot_p50_ms=1e3 * pct(tpot, 50),
             tpot_p99_ms=1e3 * pct(tpot, 99), itl_p99_ms=1e3 * pct(itl, 99), ttft_growth_s=growth,
             out_tok_s=out_tok / max(1e-9, t_end - t0), req_s=len(done) / max(1e-9, t_end - t0))
    s["sustained"] = bool(recs) and len(done) == len(recs) and s["tpot_p99_ms"] < args.tpot_slo_ms and \
        growth < args.ttft_growth_s
    return s


def fmt(tag: str, s: dict) -> str:
    return (f"[{tag}] rate {s['rate']:g}/s: {s['finished']}/{s['requests']} done, TTFT p50 {s['ttft_p50_s']:.3f}s "
            f"p99 {s['ttft_p99_s']:.3f}s, TPOT p50 {s['tpot_p50_ms']:.1f}ms p99 {s['tpot_p99_ms']:.1f}ms, ITL p99 "
            f"{s['itl_p99_ms']:.1f}ms, TTFT growth {s['ttft_growth_s']:+.2f}s, {s['out_tok_s']:.0f} tok/s -> "
            f"{'SUSTAINED' if s['sustained'] else 'not sustained'}")


# ---------------------------------------------------------------------------------------------------------------
# mmpipe: AsyncLLMEngine
# ---------------------------------------------------------------------------------------------------------------
def make_engine(model, args, max_num_seqs: int):
    from mmpipe.shared.engine import EngineConfig, LLMEngine

    prompt_max = args.prompt_len + args.new_tokens + 16
    blocks = max_num_seqs * -(-prompt_max // 16) + 64
    cfg = EngineConfig(device=args.device, dtype=args.torch_dtype, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=args.max_batched_tokens, max_model_len=prompt_max,
                       num_kv_blocks=blocks, mixed_graph_max_prefills=args.mixed_graph_max_prefills)
    return LLMEngine(model, cfg)


def engine_request(rid: str, p: dict, new_tokens: int, mrope: bool = True):
    from mmpipe.shared.types import EngineRequest, SamplingParams

    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return EngineRequest(rid, p["ids"].tolist(), sp, mm_embeds=p["emb"], mm_positions=p["mm_pos"],
                         mrope_positions=p["mpos"] if mrope else None, mrope_delta=p["delta"] if mrope else 0)


async def _drive(aengine, prompts, times, args, tag: str) -> list[dict]:
    recs: list[dict] = []
    errors: list[BaseException] = []
    start = time.perf_counter() + 0.05

    async def one(i: int, arrival: float):
        rec = dict(arrival=arrival, first=None, last=None, n=0, itls=[])
        recs.append(rec)
        req = engine_request(f"{tag}-{i}", prompts[i % len(prompts)], args.new_tokens)
        try:
            await _stream(aengine, req, rec)
        except Exception as e:  # noqa: BLE001
            rec["error"] = repr(e)
            if not errors:
                log(f"[{tag}] request {i} failed: {e!r}")
            errors.append(e)

    async def _stream(aengine, req, rec):
        prev = None
        async for out in aengine.generate(req):
            if out.new_token_ids:
                now = time.perf_counter()
                if rec["first"] is None:
                    rec["first"] = now
                else:
                    rec["itls"].append(now - prev)
                prev = now
                rec["n"] += len(out.new_token_ids)
            if out.finished:
                rec["last"] = prev
        if rec["n"] != args.new_tokens:
            rec["last"] = None

    tasks = []
    for i, t in enumerate(times):
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, start + t)))
    deadline = start + (times[-1] if times else 0) + args.drain
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for t in pending:
            t.cancel()  # the stream's finally aborts the request inside the engine
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return recs


def bench_mmpipe_online(vl, prompts, args) -> dict:
    from mmpipe.shared.engine import AsyncLLMEngine

    t0 = time.perf_counter()
    engine = make_engine(vl, args, args.max_num_seqs)
    log(f"[mmpipe online] engine ready in {time.perf_counter() - t0:.1f}s: {engine.kv_cache_info()}")
    aengine = AsyncLLMEngine(engine, max_waiting=100_000)
    results = {"config": dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens)}
    try:
        # warm-up: eager prefill shapes, sampler, graph replays at a few sizes
        asyncio.run(_drive(aengine, prompts, [0.01 * i for i in range(8)], _short(args, 8), "warm"))
        for k, rate in enumerate(args.rates):
            times = poisson_times(rate, args.duration, args.seed + k)
            t = time.perf_counter()
            recs = asyncio.run(_drive(aengine, prompts, times, args, f"r{rate:g}"))
            _wait_idle(engine)
            s = summarize(recs, rate, args.duration, args)
            s["wall_s"] = time.perf_counter() - t
            s["preemptions"] = engine.scheduler.num_preemptions
            results[str(rate)] = s
            log(fmt("mmpipe", s))
    finally:
        aengine.shutdown(timeout=60)
    del aengine, engine
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return results


def _short(args, n):
    a = argparse.Namespace(**vars(args))
    a.new_tokens, a.drain = n, 120.0
    return a


def _wait_idle(engine, timeout: float = 30.0) -> None:
    t = time.perf_counter()
    while engine.has_unfinished_requests() and time.perf_counter() - t < timeout:
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------------------
# baseline: static batches of transformers generate
# ---------------------------------------------------------------------------------------------------------------
def bench_baseline_online(hf, prompts, args, variant: str) -> dict:
    from transformers import GenerationConfig, LogitsProcessorList

    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
              eos_token_id=None)
    pad_to = None
    if variant == "compiled":
        from transformers.generation.configuration_utils import CompileConfig

        gcfg = GenerationConfig(**kw, cache_implementation="static",
                                compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))
        pad_to = args.baseline_max_batch
    else:
        gcfg = GenerationConfig(**kw)
    dev = args.device

    def run_batch(idx: list[int]) -> list[float]:
        rows = [prompts[i % len(prompts)]["ids"] for i in idx]
        if pad_to:
            rows += [rows[0]] * (pad_to - len(rows))
        ids = torch.stack(rows).to(dev)
        clock = eb._StepClock()
        with torch.no_grad():
            hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gcfg,
                        logits_processor=LogitsProcessorList([clock]))
        if dev == "cuda":
            torch.cuda.synchronize()
        return clock.t

    t = time.perf_counter()
    run_batch(list(range(min(2, args.baseline_max_batch))))  # warm-up (and the compile, for "compiled")
    if variant == "compiled":
        run_batch([0])
    results = {"config": dict(variant=variant, max_batch=args.baseline_max_batch, padded_to=pad_to),
               "warmup_s": time.perf_counter() - t}
    log(f"[baseline {variant}] warm-up (compile) {results['warmup_s']:.1f}s")
    for k, rate in enumerate(args.baseline_rates):
        times = poisson_times(rate, args.duration, args.seed + k)
        start = time.perf_counter() + 0.05
        arr = [start + x for x in times]
        recs = [dict(arrival=a, first=None, last=None, n=0, itls=[]) for a in arr]
        nxt = 0
        deadline = (arr[-1] if arr else start) + args.drain
        t = time.perf_counter()
        while nxt < len(arr):
            now = time.perf_counter()
            if now > deadline:
                break
            if arr[nxt] > now:
                time.sleep(arr[nxt] - now)
                continue
            waiting = [i for i in range(nxt, len(arr)) if arr[i] <= now][: args.baseline_max_batch]
            stamps = run_batch(waiting)
            for i in waiting:
                r = recs[i]
                r["first"], r["last"], r["n"] = stamps[0], stamps[-1], len(stamps)
                r["itls"] = [b - a for a, b in zip(stamps, stamps[1:])]
            nxt = waiting[-1] + 1
        s = summarize(recs, rate, args.duration, args)
        s["wall_s"] = time.perf_counter() - t
        results[str(rate)] = s
        log(fmt(f"baseline {variant}", s))
    if variant == "compiled" and dev == "cuda":
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------------------------------------------
# bf16 agreement with transformers generate
# ---------------------------------------------------------------------------------------------------------------
def bench_agreement(hf, prompts, args) -> dict:
    """Engine (on the plain Qwen2ForCausalLM: 1-D positions) vs hf.generate(inputs_embeds=...), greedy."""
    n, T = args.agreement_prompts, args.agreement_tokens
    ps = prompts[:n]
    engine = make_engine(hf, argparse.Namespace(**{**vars(args), "new_tokens": T}), max_num_seqs=max(1, n))
    for i, p in enumerate(ps):
        engine.add_request(engine_request(f"a{i}", p, T, mrope=False))
    got: dict[str, list[int]] = {f"a{i}": [] for i in range(n)}
    while engine.has_unfinished_requests():
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
    del engine
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    emb_layer = hf.get_input_embeddings()
    with torch.no_grad():
        embs = []
        for p in ps:
            e = emb_layer(p["ids"].to(args.device))
            e[p["mm_pos"].to(args.device)] = p["emb"].to(args.device, e.dtype)
            embs.append(e)
        embs = torch.stack(embs)
        out = hf.generate(inputs_embeds=embs, attention_mask=torch.ones(embs.shape[:2], dtype=torch.long,
                                                                        device=args.device),
                          max_new_tokens=T, min_new_tokens=T, do_sample=False, pad_token_id=0, eos_token_id=None)
    refs = out[:, -T:].tolist()
    lead, same = [], 0
    for i, ref in enumerate(refs):
        mine = got[f"a{i}"]
        k = 0
        while k < min(len(mine), len(ref)) and mine[k] == ref[k]:
            k += 1
        lead.append(k)
        same += sum(a == b for a, b in zip(mine, ref))
    res = dict(prompts=n, tokens=T, dtype=str(args.torch_dtype), leading_agreement=lead,
               median=statistics.median(lead), min=min(lead), max=max(lead),
               positionwise_fraction=same / (n * T),
               note="engine batch of all prompts (CUDA graphs) vs hf.generate on the same batch, both greedy; "
                    "inputs_embeds = token embeddings with the image rows written in; 1-D positions")
    log(f"[agreement] {args.torch_dtype}: leading tokens that agree of {T}: {lead} (median {res['median']}, "
        f"min {res['min']}); position-wise {100 * res['positionwise_fraction']:.1f}%")
    return res


# ---------------------------------------------------------------------------------------------------------------
def max_sustained(d: dict | None) -> float:
    if not d:
        return float("nan")
    ok = [float(k) for k, v in d.items() if isinstance(v, dict) and v.get("sustained")]
    return max(ok) if ok else 0.0


def write_outputs(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    a = res["args"]
    lines = [f"# Online benchmark on {res['device']}", "",
             f"torch {res['torch']}, transformers {res['transformers']}; prompt {a['prompt_len']} tokens "
             f"({a['image_tokens']} image rows), {a['new_tokens']} new tokens, Poisson arrivals for "
             f"{a['duration']:g} s per rate; SLO: p99 TPOT < {a['tpot_slo_ms']:g} ms, plus every request done "
             f"within {a['drain']:g} s of the last arrival and median TTFT growth (last third vs first third of "
             f"arrivals) < {a['ttft_growth_s']:g} s.", ""]
    systems = [("mmpipe", "mmpipe AsyncLLMEngine"), ("baseline_compiled", "HF generate static batches, "
               "static cache + compile"), ("baseline_dynamic", "HF generate static batches, dynamic cache")]
    lines += ["| system | rate (req/s) | done | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (ms) | TPOT p99 (ms) | "
              "ITL p99 (ms) | TTFT growth (s) | output tok/s | sustained |", "|---" * 11 + "|"]
    for key, name in systems:
        for k, s in (res.get(key) or {}).items():
            if not isinstance(s, dict) or "rate" not in s:
                continue
            lines.append(f"| {name} | {s['rate']:g} | {s['finished']}/{s['requests']} | {s['ttft_p50_s']:.3f} | "
                         f"{s['ttft_p99_s']:.3f} | {s['tpot_p50_ms']:.1f} | {s['tpot_p99_ms']:.1f} | "
                         f"{s['itl_p99_ms']:.1f} | {s['ttft_growth_s']:+.2f} | {s['out_tok_s']:.0f} | "
                         f"{'yes' if s['sustained'] else 'no'} |")
    m = max_sustained(res.get("mmpipe"))
    bests = {k: max_sustained(res.get(k)) for k, _ in systems[1:] if res.get(k)}
    lines += ["", "| system | highest sustained rate tried (req/s) |", "|---|---|"]
    for key, name in systems:
        if res.get(key):
            lines.append(f"| {name} | {max_sustained(res.get(key)):g} |")
    if bests and m == m:
        b = max(bests.values())
        lines += ["", f"mmpipe / best baseline: {m:g} / {b:g} = " + (f"{m / b:.2f}x" if b > 0 else
                  "baseline sustained none of its rates")]
    ag = res.get("agreement")
    if ag:
        lines += ["", f"bf16 greedy agreement with transformers generate ({ag['prompts']} prompts x {ag['tokens']} "
                  f"tokens): leading tokens that agree median {ag['median']}, min {ag['min']}, max {ag['max']} "
                  f"(per prompt: {ag['leading_agreement']}); position-wise {100 * ag['positionwise_fraction']:.1f}%"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="path prefix for .json / .md")
    ap.add_argument("--rates", default="24,40,56,64,72", help="mmpipe request rates (req/s)")
    ap.add_argument("--baseline-rates", default="12,16,18,20", help="baseline request rates (req/s)")
    ap.add_argument("--baseline-variants", default="compiled,dynamic", help="'compiled', 'dynamic', or both")
    ap.add_argument("--baseline-max-batch", type=int, default=64)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per rate")
    ap.add_argument("--drain", type=float, default=20.0, help="seconds after the last arrival before giving up")
    ap.add_argument("--tpot-slo-ms", type=float, default=50.0)
    ap.add_argument("--ttft-growth-s", type=float, default=2.0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--mixed-graph-max-prefills", type=int, default=8,
                    help="steps with at most this many prefill chunks replay as CUDA graphs; 0 = eager (A/B)")
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--image-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--distinct-prompts", type=int, default=64)
    ap.add_argument("--agreement-prompts", type=int, default=8)
    ap.add_argument("--agreement-tokens", type=int, default=64)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: agreement,mmpipe,baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny fp32 model (CPU dry run of the code paths)")
    args = ap.parse_args(argv)
    args.rates = [float(x) for x in args.rates.split(",") if x]
    args.baseline_rates = [float(x) for x in args.baseline_rates.split(",") if x]
    args.torch_dtype = torch.float32 if args.tiny else torch.bfloat16
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    import transformers

    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    log(f"device: {dev_name}, torch {torch.__version__}, transformers {transformers.__version__}")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    hf, vl = eb.build_models(args.layers, device=args.device, dtype=args.torch_dtype, tiny=args.tiny)
    hidden = hf.config.hidden_size
    prompts = eb.make_prompts(args.distinct_prompts, args.prompt_len, args.image_tokens, hidden, seed=args.seed)
    log(f"models and prompts built in {time.perf_counter() - t0:.1f}s")
    res: dict = {"device": dev_name, "torch": torch.__version__, "transformers": transformers.__version__,
                 "args": {k: v for k, v in vars(args).items() if k != "torch_dtype"}}
    out = Path(args.out)
    if "agreement" not in skip:
        try:
            res["agreement"] = bench_agreement(hf, prompts, args)
        except Exception as e:  # noqa: BLE001 - one section failing must not lose the others
            log(f"[agreement] failed: {e!r}")
            res["agreement_error"] = repr(e)
        write_outputs(res, out)
    if "mmpipe" not in skip:
        res["mmpipe"] = bench_mmpipe_online(vl, prompts, args)
        write_outputs(res, out)
    if "baseline" not in skip:
        for variant in [v for v in args.baseline_variants.split(",") if v]:
            try:
                res[f"baseline_{variant}"] = bench_baseline_online(hf, prompts, args, variant)
            except Exception as e:  # noqa: BLE001
                log(f"[baseline {variant}] failed: {e!r}")
                res[f"baseline_{variant}_error"] = repr(e)
            write_outputs(res, out)
    write_outputs(res, out)


if __name__ == "__main__":
    main()
