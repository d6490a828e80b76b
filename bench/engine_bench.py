"""Decode throughput of mmpipe's engine vs transformers on a Qwen2.5-VL-3B-sized text model (random bf16).

    python bench/engine_bench.py --out results/engine_h100 [--concurrency 1,8,32,64,128] [--skip-compiled]

Each request: a ~1,000-token prompt with one image's worth of embedding rows (256 random rows), exactly 128
new tokens (ignore_eos). Reported per concurrency: output tok/s (all tokens / wall time, prefill included) and
ms per decode step, for
  (a) mmpipe's engine (LLMEngine on a Qwen2_5_VLForConditionalGeneration; M-RoPE positions, mm rows),
  (b) transformers `generate` on static batches: dynamic cache, and static cache compiled
      (cache_implementation="static", CompileConfig(fullgraph=True, mode="reduce-overhead")),
  (c) transformers `generate_batch` (continuous batching) on the same prompts as token ids,
and the roofline per step: (weight bytes + KV bytes read) / copy bandwidth measured in the same run.
Writes <out>.json, <out>.md and <out>.png (if matplotlib is there).

`--gemma3` runs the Gemma-3-sized sliding-window decode row instead (bench/gemma3_decode.py: a 4B-sized Gemma 3
text model, 5 sliding layers of window 1024 per global one; engine ms/step against the windowed roofline).

No download: the text model is a Qwen2ForCausalLM built from a config with random weights; the engine's
entry point is a Qwen2_5_VLForConditionalGeneration built on the meta device whose text decoder and lm_head
are those same modules (no weight copy), with its own M-RoPE rotary embedding.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

TEXT = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
            intermediate_size=11008, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
            tie_word_embeddings=True)
ROPE = {"rope_type": "default", "rope_theta": 1000000.0}
MROPE_SECTION = [16, 24, 24]
IMAGE_TOKEN_ID = 151655


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# models and prompts
# ---------------------------------------------------------------------------------------------------------------
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)  # CPU dry runs


def build_models(layers: int, device: str = "cuda", dtype=torch.bfloat16, tiny: bool = False):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    text = dict(TEXT, num_hidden_layers=layers, **(TINY if tiny else {}))
    torch.manual_seed(0)
    with torch.device(device):
        qcfg = Qwen2Config(**text, rope_parameters=dict(ROPE))
        qcfg._attn_implementation = "sdpa"
        hf = Qwen2ForCausalLM(qcfg).to(dtype).eval()
    section = [2, 3, 3] if tiny else MROPE_SECTION  # sums to head_dim / 2
    vcfg = Qwen2_5_VLConfig(text_config=dict(text, rope_parameters=dict(ROPE, mrope_section=section)),
                            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                               out_hidden_size=text["hidden_size"]),
                            image_token_id=IMAGE_TOKEN_ID, tie_word_embeddings=True)
    with torch.device("meta"):
        vl = Qwen2_5_VLForConditionalGeneration(vcfg).eval()
    lm = vl.model.language_model
    lm.embed_tokens, lm.layers, lm.norm = hf.model.embed_tokens, hf.model.layers, hf.model.norm
    lm.rotary_emb = Qwen2_5_VLRotaryEmbedding(vcfg.text_config).to(device)
    vl.lm_head = hf.lm_head
    return hf, vl


def make_prompts(n: int, prompt_len: int, image_tokens: int, hidden: int, seed: int = 0):
    """Token ids with `image_tokens` placeholder rows (a square grid), random rows, synthetic M-RoPE positions."""
    g = torch.Generator().manual_seed(seed)
    side = int(image_tokens ** 0.5)
    rows = side * side
    out = []
    for i in range(n):
        pre = 20 + (i % 7)
        post = prompt_len - pre - rows
        ids = torch.randint(0, 150000, (prompt_len,), generator=g)
        ids[pre:pre + rows] = IMAGE_TOKEN_ID
        emb = (torch.randn(rows, hidden, generator=g) * 0.02).to(torch.bfloat16)
        grid_h = torch.arange(side).repeat_interleave(side)
        grid_w = torch.arange(side).repeat(side)
        img = torch.stack([torch.zeros(rows, dtype=torch.long), grid_h, grid_w]) + pre
        tail = torch.arange(post) + pre + side
        mpos = torch.cat([torch.arange(pre).expand(3, -1), img, tail.expand(3, -1)], dim=1)
        delta = int(mpos.max()) + 1 - prompt_len
        out.append(dict(ids=ids, emb=emb, mm_pos=torch.arange(pre, pre + rows), mpos=mpos, delta=delta))
    return out


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    x = torch.empty(2 ** 31, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 20 / (s.elapsed_time(e) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return bw


def weight_bytes(hf) -> int:
    """Bytes a decode step must read: every weight once (tied embedding counted once, as the lm_head)."""
    seen, total = set(), 0
    for p in hf.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(layers: int) -> int:
    return layers * 2 * TEXT["num_key_value_heads"] * (TEXT["hidden_size"] // TEXT["num_attention_heads"]) * 2


def bench_engine(vl, prompts, concs, new_tokens, max_model_len, kv_blocks, pack=True, profile=(), tag="engine",
                 profile_mixed=(), prefill_attn=(), profile_chunked=(), mixed_graphs=()):
    from mmpipe.shared.engine import EngineConfig, LLMEngine
    from mmpipe.shared.types import EngineRequest, SamplingParams

    t0 = time.perf_counter()
    # profile_mixed_step keeps c + 5 requests running at once: leave room for them
    cfg = EngineConfig(device="cuda", dtype=torch.bfloat16, max_num_seqs=max([*concs, *(c + 8 for c in profile_mixed)]),
                       max_num_batched_tokens=2048,
                       max_model_len=max_model_len, num_kv_blocks=kv_blocks, pack_weights=pack)
    engine = LLMEngine(vl, cfg)
    info = engine.kv_cache_info()
    log(f"[{tag}] ready in {time.perf_counter() - t0:.1f}s: {info}")
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def req(i, p, s=sp):
        return EngineRequest(f"r{i}", p["ids"].tolist(), s, mm_embeds=p["emb"], mm_positions=p["mm_pos"],
                             mrope_positions=p["mpos"], mrope_delta=p["delta"])

    # warm-up (eager prefill kernels, sampler)
    for i in range(2):
        engine.add_request(req(f"w{i}", prompts[i], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()

    results = {}
    for c in concs:
        for i in range(c):
            engine.add_request(req(f"c{c}-{i}", prompts[i]))
        steps, n_out = [], 0
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            before = dict(engine.stats)
            ts = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - ts
            n_out += sum(len(o.new_token_ids) for o in outs)
            pre = engine.stats["prefill_tokens"] - before["prefill_tokens"]
            dec = engine.stats["decode_tokens"] - before["decode_tokens"]
            graph = engine.stats["graph_steps"] - before["graph_steps"]
            steps.append((dt, pre, dec, graph))
        total = time.perf_counter() - t0
        pure = [dt for dt, pre, dec, g in steps if pre == 0 and dec == c]
        pure = pure[1:] or pure  # first step at a new size can pay a one-off cost
        ms = 1e3 * statistics.median(pure) if pure else float("nan")
        results[c] = dict(tok_s=n_out / total, ms_per_step=ms, total_s=total, steps=len(steps),
                          decode_steps_at_c=len(pure), graph_steps=sum(s[3] for s in steps), out_tokens=n_out)
        log(f"[{tag}] c={c}: {n_out / total:.0f} tok/s, {ms:.2f} ms/decode step ({len(pure)} steps at batch {c}),"
            f" total {total:.2f}s, {len(steps)} steps")
    for c in profile:
        results[f"profile_{c}"] = profile_engine(engine, lambda i: req(f"p{c}-{i}", prompts[i], SamplingParams(
            max_tokens=new_tokens, temperature=0.0, ignore_eos=True)), c)
    runner, attn = engine.runner, engine.runner.attn
    captured, captured_prefill = runner.mixed_graphs, runner.prefill_graphs
    # A/B in one process: prefill attention ("triton" / "sdpa", the previous per-sequence SDPA path) and mixed
    # steps as CUDA graphs or eager. The captured graphs hold the Triton prefill kernel, so sdpa runs eagerly.
    modes = [(impl, mg) for impl in (list(prefill_attn) or [getattr(attn, "prefill_impl", None)])
             for mg in (list(mixed_graphs) or [captured is not None]) if not (impl == "sdpa" and mg)]
    for impl, mg in modes:
        if impl is not None:
            attn.prefill_impl = impl
        runner.mixed_graphs, runner.prefill_graphs = (captured, captured_prefill) if mg else (None, None)
        sfx = (f"_{impl}" if prefill_attn else "") + (("_graph" if mg else "_eager") if mixed_graphs else "")
        for c in profile_mixed:
            log(f"[profile mixed] prefill attention: {impl}, mixed graphs: {mg}")
            results[f"profile_mixed_{c}{sfx}"] = profile_mixed_step(engine, lambda i, n=new_tokens, c=c: req(
                f"m{c}{sfx}-{i}", prompts[i % len(prompts)], SamplingParams(max_tokens=n, temperature=0.0,
                                                                          ignore_eos=True)), c)
        if profile_chunked:
            log(f"[profile chunked] prefill attention: {impl}, mixed graphs: {mg}")
            results[f"profile_chunked{sfx}"] = profile_chunked_prefill(engine, lambda i: req(
                f"k{sfx}-{i}", prompts[i % len(prompts)], SamplingParams(max_tokens=2, temperature=0.0,
                                                                         ignore_eos=True)), profile_chunked)
    runner.mixed_graphs, runner.prefill_graphs = captured, captured_prefill
    if modes and modes[0][0] is not None:
        attn.prefill_impl = modes[0][0]
    info = engine.kv_cache_info()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return results, info


def replay_ms(graph, n: int) -> float:
    """GPU time of one replay of a captured CUDA graph (events over n replays after one warm replay)."""
    graph.replay()
    torch.cuda.synchronize()
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record()
    for _ in range(n):
        graph.replay()
    ev1.record()
    torch.cuda.synchronize()
    return ev0.elapsed_time(ev1) / n


def profile_engine(engine, make_req, c):
    """Where a decode step at batch c spends its time: host parts, GPU replay alone, top kernels."""
    from collections import defaultdict

    for i in range(c):
        engine.add_request(make_req(i))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or \
            engine.scheduler.waiting:
        engine.step()
    r, g = engine.runner, engine.runner.graphs
    spent: dict[str, list[float]] = defaultdict(list)

    def timed(obj, name, key):
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent[key].append(time.perf_counter() - t)
            return out
        setattr(obj, name, wrapper)
        return fn

    orig = [(engine.scheduler, "schedule", timed(engine.scheduler, "schedule", "schedule")),
            (g, "_fill", timed(g, "_fill", "fill+h2d")),
            (r, "sampler", r.sampler)]
    sampler = r.sampler
    def sample_timed(logits, seqs):
        t = time.perf_counter()
        out = sampler(logits, seqs)
        spent["sample+sync"].append(time.perf_counter() - t)
        return out
    r.sampler = sample_timed
    walls = []
    for _ in range(12):
        t = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t)
    for obj, name, fn in orig:
        setattr(obj, name, fn)
    bucket = next(s for s in g.sizes if s >= c)
    gpu_ms = replay_ms(g.graphs[bucket], 20)
    prof_rows = []
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
        ka = sorted(prof.key_averages(), key=lambda k: -getattr(k, "self_device_time_total",
                                                                 getattr(k, "self_cuda_time_total", 0)))
        for k in ka[:14]:
            t_us = getattr(k, "self_device_time_total", getattr(k, "self_cuda_time_total", 0)) / 3
            prof_rows.append((k.key[:90], k.count // 3, round(t_us, 1)))
    except Exception as ex:  # noqa: BLE001
        prof_rows.append((f"profiler failed: {ex!r}", 0, 0))
    for rid in list(engine._seqs):
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    out = {"wall_ms": 1e3 * statistics.median(walls), "gpu_replay_ms": gpu_ms, "bucket": bucket,
           **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in spent.items()}, "top_kernels_us_per_step": prof_rows}
    log(f"[profile c={c}] wall {out['wall_ms']:.2f} ms, graph replay alone {gpu_ms:.2f} ms, " +
        ", ".join(f"{k} {1e3 * statistics.median(v):.3f} ms" for k, v in spent.items()))
    for row in prof_rows:
        log(f"    {row[2]:9.1f} us  x{row[1]:<4d} {row[0]}")
    return out


def profile_mixed_step(engine, make_req, c, reps=4):
    """A step that decodes c running requests and prefills one new ~1,000-token prompt (what every step looks
    like online while requests keep arriving), against a pure prefill step of the same prompt: wall time,
    host time until the forward is launched (input building), host time inside the forward (launches), GPU
    time of the step (events). A step replayed as a mixed CUDA graph calls no forward: its host parts are
    reported as None and `graph` is 1."""
    r = engine.runner
    for i in range(c):
        engine.add_request(make_req(i))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or \
            engine.scheduler.waiting:
        engine.step()
    fwd = r.decoder.forward
    spent = {}

    def fwd_timed(*a, **k):
        spent["prep_end"] = time.perf_counter()
        out = fwd(*a, **k)
        spent["fwd_end"] = time.perf_counter()
        return out
    r.decoder.forward = fwd_timed
    rows = []
    try:
        for k in range(reps):
            engine.add_request(make_req(c + k))
            spent.clear()
            graphs_before = engine.stats["mixed_graph_steps"]
            torch.cuda.synchronize()
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            ev0.record()
            outs = engine.step()
            ev1.record()
            wall = time.perf_counter() - t0
            torch.cuda.synchronize()
            eager = "prep_end" in spent
            rows.append(dict(wall_ms=1e3 * wall, prep_ms=1e3 * (spent["prep_end"] - t0) if eager else None,
                             launch_ms=1e3 * (spent["fwd_end"] - spent["prep_end"]) if eager else None,
                             gpu_ms=ev0.elapsed_time(ev1), decodes=sum(1 for o in outs if o.new_token_ids) - 1,
                             graph=engine.stats["mixed_graph_steps"] - graphs_before))
        # kernels of one more such step
        from torch.profiler import ProfilerActivity, profile

        engine.add_request(make_req(c + reps))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            engine.step()
            torch.cuda.synchronize()
        key = lambda k: getattr(k, "self_device_time_total", getattr(k, "self_cuda_time_total", 0))  # noqa: E731
        avgs = prof.key_averages()
        kern = [(k.key[:90], k.count, round(key(k), 1)) for k in sorted(avgs, key=lambda k: -key(k))[:12]]
        kernel_ms = sum(key(k) for k in avgs) / 1e3  # GPU busy time of the step (all kernels and copies)
        cpu = [(k.key[:90], k.count, round(k.self_cpu_time_total, 1))
               for k in sorted(avgs, key=lambda k: -k.self_cpu_time_total)[:8]]
        alone_ms = None
        mg = r.mixed_graphs
        if mg is not None and mg.capture_enabled and rows[-1]["graph"]:
            # the last step's graph alone, on its staged inputs (it rewrites the same KV slots with the same values)
            alone_ms = replay_ms(mg.graphs[mg.last_size], 10)
    finally:
        r.decoder.forward = fwd
    for rid in list(engine._seqs):
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    out = {k: (statistics.median(x[k] for x in rows) if rows[0][k] is not None else None) for k in rows[0]}
    out["note"] = (f"one step = {c} decodes + one new prompt's first chunk (up to max_num_batched_tokens); "
                   "graph = 1 when it replayed a mixed CUDA graph; eager steps: prep = host work before the "
                   "forward, launch = host time inside the forward")
    out["kernel_sum_ms"] = kernel_ms
    out["graph_replay_alone_ms"] = alone_ms
    out["top_kernels_us"] = kern
    out["top_cpu_ops_us"] = cpu
    log(f"[profile mixed c={c}] " + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in out.items() if k not in (
        "note", "top_kernels_us", "top_cpu_ops_us")))
    for row in kern:
        log(f"    {row[2]:9.1f} us  x{row[1]:<4d} {row[0]}")
    log("    host (self CPU time, under the profiler):")
    for row in cpu:
        log(f"    {row[2]:9.1f} us  x{row[1]:<4d} {row[0]}")
    return out


def profile_chunked_prefill(engine, make_req, budgets):
    """Prefill one prompt alone under each token budget in `budgets`, so that it is split into chunks whose
    lengths (and cached prefixes) differ from budget to budget: GPU time (events) and wall time of every step.
    The first chunk of a prompt has no prefix; the others attend to a cached prefix. New shapes every time:
    a backend that builds a plan per shape pays for it here."""
    sch = engine.scheduler
    saved = sch.max_num_batched_tokens
    out = {}
    try:
        for j, b in enumerate(budgets):
            sch.max_num_batched_tokens = b
            engine.add_request(make_req(j))
            seq = sch.waiting[-1]
            steps = []
            while seq.num_computed_tokens < seq.num_prompt_tokens:
                n0 = seq.num_computed_tokens
                torch.cuda.synchronize()
                ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                ev0.record()
                engine.step()
                ev1.record()
                torch.cuda.synchronize()
                steps.append(dict(prefix=n0, tokens=seq.num_computed_tokens - n0, gpu_ms=ev0.elapsed_time(ev1),
                                  wall_ms=1e3 * (time.perf_counter() - t0)))
            for rid in list(engine._seqs):
                engine.abort_request(rid)
            while engine.has_unfinished_requests():
                engine.step()
            tot = sum(x["gpu_ms"] for x in steps)
            out[b] = dict(steps=steps, prompt_gpu_ms=tot)
            log(f"[profile chunked] budget {b}: prompt prefilled in {len(steps)} steps, GPU {tot:.1f} ms: " +
                ", ".join(f"{x['tokens']}@{x['prefix']} {x['gpu_ms']:.1f}" for x in steps))
    finally:
        sch.max_num_batched_tokens = saved
    return out


class _StepClock:
    """A logits processor that only records when each generation step's logits are ready."""

    def __init__(self):
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores


def bench_hf_generate(hf, prompts, concs, new_tokens, compiled: bool):
    from transformers import GenerationConfig, LogitsProcessorList

    results = {}
    for c in concs:
        ids = torch.stack([p["ids"] for p in prompts[:c]]).cuda()
        am = torch.ones_like(ids)
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
        if compiled:
            from transformers.generation.configuration_utils import CompileConfig

            gc_ = GenerationConfig(**kw, cache_implementation="static",
                                   compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))
        else:
            gc_ = GenerationConfig(**kw)
        runs = 2 if compiled else 1  # the first compiled run compiles
        for r in range(runs):
            clock = _StepClock()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(input_ids=ids, attention_mask=am, generation_config=gc_,
                                  logits_processor=LogitsProcessorList([clock]))
            torch.cuda.synchronize()
            total = time.perf_counter() - t0
            if compiled and r == 0:
                log(f"[hf {'compiled' if compiled else 'dynamic'}] c={c}: first run (compile) {total:.1f}s")
        n_new = (out.shape[1] - ids.shape[1]) * c
        gaps = [b - a for a, b in zip(clock.t, clock.t[1:])]
        ms = 1e3 * statistics.median(gaps) if gaps else float("nan")
        results[c] = dict(tok_s=n_new / total, ms_per_step=ms, total_s=total, out_tokens=n_new)
        log(f"[hf {'compiled' if compiled else 'dynamic'}] c={c}: {n_new / total:.0f} tok/s, {ms:.2f} ms/step, "
            f"total {total:.2f}s")
        del out
        torch.cuda.empty_cache()
        if compiled:
            torch._dynamo.reset()
    return results


def bench_hf_generate_batch(hf, prompts, concs, new_tokens):
    from transformers import GenerationConfig

    results = {}
    gc_ = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
    for c in concs:
        inputs = [p["ids"].tolist() for p in prompts[:c]]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate_batch(inputs=inputs, generation_config=gc_)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        n_new = sum(len(r.generated_tokens) for r in out.values())
        results[c] = dict(tok_s=n_new / total, ms_per_step=1e3 * total / new_tokens, total_s=total,
                          out_tokens=n_new, note="ms_per_step = wall time / new tokens (prefill included)")
        log(f"[hf generate_batch] c={c}: {n_new / total:.0f} tok/s, {1e3 * total / new_tokens:.1f} ms per token"
            f" step (incl. prefill), total {total:.2f}s")
    return results


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="path prefix for .json / .md / .png")
    ap.add_argument("--concurrency", default="1,8,32,64,128")
    ap.add_argument("--hf-concurrency", default=None, help="default: --concurrency")
    ap.add_argument("--cb-concurrency", default=None, help="default: --concurrency")
    ap.add_argument("--compiled-concurrency", default="1,64")
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--image-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--skip-hf", action="store_true", help="skip all transformers baselines")
    ap.add_argument("--skip-compiled", action="store_true", help="skip (b) static cache + torch.compile")
    ap.add_argument("--skip-cb", action="store_true", help="skip (c) generate_batch")
    ap.add_argument("--profile", default="", help="concurrencies to profile (host / GPU / kernels), e.g. 1,64")
    ap.add_argument("--profile-mixed", default="", help="profile a decode+prefill step at these batch sizes "
                    "(0 = a prefill alone), e.g. 0,64")
    ap.add_argument("--prefill-attn", default="", help="A/B the prefill attention of the triton backend in the "
                    "profiles, e.g. sdpa,triton (sdpa = the previous per-sequence SDPA path)")
    ap.add_argument("--profile-chunked", default="", help="prefill one prompt alone under each of these token "
                    "budgets (chunks after a cached prefix, new shapes each time), e.g. 256,384,500,777,1000")
    ap.add_argument("--mixed-graphs", default="", help="A/B steps with prefill chunks as CUDA graphs or eagerly "
                    "in the profiles, e.g. off,on")
    ap.add_argument("--compare-pack", action="store_true", help="also run the engine without weight packing")
    ap.add_argument("--gemma3", action="store_true", help="only the Gemma-3-sized sliding-window decode row "
                    "(bench/gemma3_decode.py), written to <out>.json")
    args = ap.parse_args(argv)
    concs = [int(x) for x in args.concurrency.split(",")]
    parse = lambda s: concs if s is None else [int(x) for x in s.split(",") if x]  # noqa: E731

    torch.backends.cuda.matmul.allow_tf32 = False
    log(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    import transformers

    log(f"transformers {transformers.__version__}")
    bw = copy_bandwidth()
    log(f"copy bandwidth: {bw / 1e12:.2f} TB/s")
    if args.gemma3:
        sys.path.insert(0, str(Path(__file__).parent))
        import gemma3_decode

        row = gemma3_decode.run(args, bench_engine, weight_bytes, bw, log)
        out = Path(args.out).with_suffix(".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bw,
                                   "args": vars(args), "gemma3": row}, indent=2, default=str))
        return
    t0 = time.perf_counter()
    hf, vl = build_models(args.layers)
    log(f"models built in {time.perf_counter() - t0:.1f}s")
    wbytes = weight_bytes(hf)
    kvtok = kv_bytes_per_token(args.layers)
    prompts = make_prompts(max(concs + [8]), args.prompt_len, args.image_tokens, TEXT["hidden_size"])
    max_model_len = args.prompt_len + args.new_tokens + 16
    blocks_per_seq = -(-max_model_len // 16)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "copy_bandwidth_Bps": bw, "weight_bytes": wbytes,
                 "kv_bytes_per_token": kvtok, "args": vars(args), "roofline": {}}
    for c in concs:
        ctx = args.prompt_len + args.new_tokens / 2  # mean context over the decode steps
        step_bytes = wbytes + c * ctx * kvtok
        res["roofline"][c] = dict(ms_per_step=1e3 * step_bytes / bw, tok_s=c / (step_bytes / bw),
                                  bytes_per_step=step_bytes)
    pm = [int(x) for x in args.profile_mixed.split(",") if x]
    blocks = max([*concs, *(c + 8 for c in pm)]) * blocks_per_seq + 64
    if args.compare_pack:  # first: packing re-points the weights for good
        res["engine_unpacked"], _ = bench_engine(vl, prompts, [c for c in concs if c in (1, 64)] or concs[:1],
                                                 args.new_tokens, max_model_len, blocks, pack=False,
                                                 tag="engine unpacked")
    prof = [int(x) for x in args.profile.split(",") if x]
    res["engine"], res["engine_kv_info"] = bench_engine(vl, prompts, concs, args.new_tokens, max_model_len, blocks,
                                                        profile=prof, profile_mixed=pm,
                                                        prefill_attn=[x for x in args.prefill_attn.split(",") if x],
                                                        mixed_graphs=[x == "on" for x in args.mixed_graphs.split(",") if x],
                                                        profile_chunked=[int(x) for x in
                                                                         args.profile_chunked.split(",") if x])
    write_outputs(res, Path(args.out))  # after each section: a later timeout loses nothing
    if not args.skip_hf:
        res["hf_dynamic"] = bench_hf_generate(hf, prompts, parse(args.hf_concurrency), args.new_tokens, False)
        write_outputs(res, Path(args.out))
        if not args.skip_cb:
            try:
                res["hf_generate_batch"] = bench_hf_generate_batch(hf, prompts, parse(args.cb_concurrency),
                                                                   args.new_tokens)
            except Exception as e:  # noqa: BLE001 - a baseline failing must not lose the other numbers
                log(f"[hf generate_batch] failed: {e!r}")
                res["hf_generate_batch_error"] = repr(e)
            write_outputs(res, Path(args.out))
        if not args.skip_compiled:
            try:
                res["hf_static_compiled"] = bench_hf_generate(hf, prompts, parse(args.compiled_concurrency),
                                                              args.new_tokens, True)
            except Exception as e:  # noqa: BLE001
                log(f"[hf compiled] failed: {e!r}")
                res["hf_static_compiled_error"] = repr(e)
    write_outputs(res, Path(args.out))


def write_outputs(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    systems = [("engine", "mmpipe engine"), ("hf_dynamic", "HF generate, dynamic cache"),
               ("hf_static_compiled", "HF generate, static cache + compile"),
               ("hf_generate_batch", "HF generate_batch")]
    concs = sorted(res["roofline"], key=int)
    lines = [f"# Engine benchmark on {res['device']}",
             "",
             f"torch {res['torch']}, transformers {res['transformers']}; copy bandwidth "
             f"{res['copy_bandwidth_Bps'] / 1e12:.2f} TB/s; weights {res['weight_bytes'] / 1e9:.2f} GB; "
             f"KV {res['kv_bytes_per_token'] / 1024:.0f} KiB/token. Prompt {res['args']['prompt_len']} tokens "
             f"({res['args']['image_tokens']} image rows), {res['args']['new_tokens']} new tokens.",
             "",
             "| concurrency | roofline ms/step | " + " | ".join(f"{n} tok/s | ms/step" for _, n in systems) +
             " | engine % of roofline |",
             "|---" * (3 + 2 * len(systems)) + "|"]
    for c in concs:
        roof = res["roofline"][c]["ms_per_step"]
        row = [str(c), f"{roof:.2f}"]
        for key, _ in systems:
            r = res.get(key, {}).get(c) or res.get(key, {}).get(str(c))
            row += [f"{r['tok_s']:.0f}", f"{r['ms_per_step']:.2f}"] if r else ["-", "-"]
        e = res["engine"].get(c) or res["engine"].get(str(c))
        row.append(f"{100 * roof / e['ms_per_step']:.0f}%" if e else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "tok/s: output tokens / wall time (prefill included). Engine ms/step: median wall time of a "
              "decode step at the full batch (host work, CUDA graph replay and sampling included). HF generate "
              "ms/step: median gap between decode steps. generate_batch ms/step: wall time / new tokens."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [int(c) for c in concs]
    ax.plot(xs, [res["roofline"][c]["tok_s"] for c in concs], "k--", label="roofline (decode)")
    for key, name in systems:
        d = res.get(key)
        if d:
            pts = sorted((int(c), v["tok_s"]) for c, v in d.items() if str(c).isdigit())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"Qwen2.5-VL-3B-sized text model, bf16, {res['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
