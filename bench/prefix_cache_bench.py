"""Prefix caching on the offline engine (`mmpipe.LLM`): the cache on against the cache off, in one run.

    python bench/prefix_cache_bench.py --out bench/results/prefix_cache_bench            # GPU: the 3B model
    python bench/prefix_cache_bench.py --out /tmp/pcb --smoke                            # CPU smoke, seconds

Two `LLM`s on the same model dir, one with `enable_prefix_caching=True` and one with False, alive together and
measured alternately (same process, same GPU, same inputs), each warmed up first (not counted). Sections:

  ttft    a 3-turn chat over one --image-size image (448 px: 256 tokens on Qwen2.5-VL) whose prompt reaches
          --history-tokens (~1,000) by the third turn: the first user message carries the image and a context
          text, each earlier answer is a canned --answer-tokens reply, each turn adds a short question. TTFT of
          turns 2 and 3 = the wall time of `LLM.chat(..., max_tokens=1)` (template, tokenize, the image's
          embedding-cache hit, prefill, the first token). --repeats conversations, each over its own image (so a
          turn never hits its own earlier copy); median and each run. Target (issue 12): on <= 30% of off.
  unique  nothing shared: --unique-requests chats, each starting with its own system text and holding its own
          image, --unique-output-tokens tokens each (ignore_eos), generated as one batch. The images are encoded
          in a warm-up pass under other prompts first, so both sides measure the LM only (and the cache-on side
          pays for evicting the warm-up's blocks). Output tokens/s over --unique-rounds rounds (fresh prompts
          each); target: on >= 97% of off.
  mix     --mix-requests chat requests in batches of --batch: --mix-share (80%) repeat one of --mix-pool (8)
          images after one --system-tokens system prompt, the rest bring a fresh image after the same system
          prompt; every request asks its own question. Prefix-cache hit rate (cached / prompt tokens, from
          `RequestOutput.num_cached_tokens`), the share of requests with a hit, and wall time on vs off.

Bounded: every loop has a count, --budget-s skips sections that would not fit. Writes <out>.json and <out>.md
after each section. Without --model it builds (or reuses) the Qwen2.5-VL-3B-sized random model of
bench/build_3b_model.py on CUDA; --smoke uses the tiny qwen2_5_vl test model on the CPU with small counts.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

T0 = time.monotonic()
DEFAULT_3B_DIR = "/tmp/mmpipe-bench/qwen2_5_vl_3b_random"
WORDS = ("the image shows a small red house near a river with tall trees under a grey sky while two people walk "
         "along the bank and a dog runs ahead of them towards an old stone bridge").split()
SMOKE = dict(image_size=56, history_tokens=240, answer_tokens=16, repeats=2, unique_requests=4,
             unique_output_tokens=8, unique_rounds=1, mix_requests=8, mix_pool=3, mix_output_tokens=4, batch=4,
             system_tokens=40)


def log(*a: Any) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s]", *a, flush=True)


# ---- inputs --------------------------------------------------------------------------------------------------
def image(seed: int, size: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def words(tokenizer, n_tokens: int, salt: int = 0) -> str:
    """Plain text of about `n_tokens` tokens (one encode per doubling, then word by word)."""
    out: list[str] = []
    i = salt
    while len(tokenizer.encode(" ".join(out), add_special_tokens=False)) < n_tokens:
        step = max(1, (n_tokens - len(tokenizer.encode(" ".join(out), add_special_tokens=False))) // 2)
        for _ in range(step):
            out.append(WORDS[i % len(WORDS)])
            i += 1
        if len(out) > 20 * n_tokens + 20:  # a tokenizer that gives no tokens for these words
            break
    return " ".join(out)


def user(text: str, img=None) -> dict:
    parts = [{"type": "image_pil", "image_pil": img}] if img is not None else []
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def conversation(r: int, img, context: str, answer: str) -> list[list[dict]]:
    """The three turns' messages of conversation `r`."""
    t1 = [user(f"Conversation {r}. {context} What is in this image?", img)]
    t2 = t1 + [{"role": "assistant", "content": answer}, user("And what colour is the sky?")]
    t3 = t2 + [{"role": "assistant", "content": answer}, user("How many people are there?")]
    return [t1, t2, t3]


# ---- measurements ----------------------------------------------------------------------------------------------
def sampling(n: int, ignore_eos: bool = True):
    from mmpipe import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=ignore_eos)


def timed_chat(llm, messages, n: int = 1):
    t = time.perf_counter()
    outs = llm.chat(messages, sampling(n), use_tqdm=False)
    return time.perf_counter() - t, outs


def calibrate_context(llm, a) -> tuple[str, str]:
    """(context, answer) texts so that conversation turn 3 has about --history-tokens prompt tokens."""
    tok = llm.tokenizer
    answer = words(tok, a.answer_tokens)
    _, outs = timed_chat(llm, conversation(-1, image(10_000, a.image_size), "", answer)[2])
    base = len(outs[0].prompt_token_ids)
    context = words(tok, max(0, a.history_tokens - base), salt=7) if a.history_tokens > base else ""
    return context, answer


def section_ttft(llms: dict, a, res: dict) -> None:
    context, answer = calibrate_context(llms["off"], a)
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for r in range(a.repeats):
        img = image(1000 + r, a.image_size)
        turns = conversation(r, img, context, answer)
        for side in ("on", "off") if r % 2 == 0 else ("off", "on"):  # alternate who goes first
            llm = llms[side]
            timed_chat(llm, turns[0])  # turn 1: encodes the image, fills the cache (on)
            row = {}
            for t in (2, 3):
                dt, outs = timed_chat(llm, turns[t - 1])
                row[f"turn{t}_ttft_ms"] = round(dt * 1e3, 2)
                row[f"turn{t}_prompt_tokens"] = len(outs[0].prompt_token_ids)
                row[f"turn{t}_cached_tokens"] = outs[0].num_cached_tokens
            runs[side].append(row)
        log(f"ttft {r + 1}/{a.repeats}: on {runs['on'][-1]} off {runs['off'][-1]}")
    summary = {}
    for t in (2, 3):
        on = statistics.median(x[f"turn{t}_ttft_ms"] for x in runs["on"])
        off = statistics.median(x[f"turn{t}_ttft_ms"] for x in runs["off"])
        summary[f"turn{t}"] = {"on_ms": round(on, 2), "off_ms": round(off, 2), "on_over_off": round(on / off, 3),
                               "prompt_tokens": runs["on"][0][f"turn{t}_prompt_tokens"],
                               "cached_tokens_on": runs["on"][0][f"turn{t}_cached_tokens"],
                               "target": "<= 0.30", "met": on / off <= 0.30}
    res["ttft"] = {"summary": summary, "runs": runs, "answer_tokens": a.answer_tokens,
                   "history_tokens": a.history_tokens}


def unique_prompts(tag: str, imgs: list) -> list[list[dict]]:
    """One chat per image whose system message starts with its own hex id, so the first KV block (and so every
    block, the keys being chained) differs from every other request's."""
    import hashlib

    return [[{"role": "system", "content": f"{hashlib.blake2b(f'{tag}/{i}'.encode(), digest_size=6).hexdigest()} "
                                           f"You describe pictures."},
             user("Describe this picture in detail.", img)] for i, img in enumerate(imgs)]


def section_unique(llms: dict, a, res: dict) -> None:
    rounds: dict[str, list[dict]] = {"on": [], "off": []}
    for k in range(a.unique_rounds):
        imgs = [image(20_000 + 1000 * k + i, a.image_size) for i in range(a.unique_requests)]
        for side in ("on", "off") if k % 2 == 0 else ("off", "on"):
            llm = llms[side]
            llm.chat(unique_prompts(f"warm-up {side} {k}", imgs), sampling(1), use_tqdm=False)
            prompts = unique_prompts(f"round {side} {k}", imgs)
            t = time.perf_counter()
            outs = llm.chat(prompts, sampling(a.unique_output_tokens), use_tqdm=False)
            dt = time.perf_counter() - t
            n_out = sum(len(o.outputs[0].token_ids) for o in outs)
            rounds[side].append({"wall_s": round(dt, 3), "output_tokens": n_out,
                                 "output_tok_s": round(n_out / dt, 1),
                                 "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
                                 "cached_tokens": sum(o.num_cached_tokens for o in outs)})
        log(f"unique round {k + 1}/{a.unique_rounds}: on {rounds['on'][-1]} off {rounds['off'][-1]}")
    on = statistics.median(x["output_tok_s"] for x in rounds["on"])
    off = statistics.median(x["output_tok_s"] for x in rounds["off"])
    res["unique"] = {"summary": {"on_tok_s": on, "off_tok_s": off, "on_over_off": round(on / off, 3),
                                 "target": ">= 0.97", "met": on / off >= 0.97},
                     "rounds": rounds, "requests": a.unique_requests, "output_tokens": a.unique_output_tokens}


def mix_requests(a, system: str, salt: int = 0) -> list[list[dict]]:
    import random

    rng = random.Random(salt)
    out = []
    for i in range(a.mix_requests):
        if rng.random() < a.mix_share:
            img = image(30_000 + 100 * salt + rng.randrange(a.mix_pool), a.image_size)
        else:
            img = image(40_000 + 10_000 * salt + i, a.image_size)
        out.append([{"role": "system", "content": system}, user(f"Question {i}: what do you see?", img)])
    return out


def section_mix(llms: dict, a, res: dict) -> None:
    """Each side first runs the same mix over other images (not counted: the towers compile and capture their
    graphs for these batch layouts there, which would otherwise land on whichever side runs first), then the
    measured mix, the sides in turn: off first, so that any warm-up left over would favour the cache-off side."""
    system = words(llms["on"].tokenizer, a.system_tokens, salt=3)
    for side in ("on", "off"):
        warm = mix_requests(a, words(llms[side].tokenizer, a.system_tokens, salt=4), salt=1)
        for b in range(0, len(warm), a.batch):
            llms[side].chat(warm[b:b + a.batch], sampling(a.mix_output_tokens), use_tqdm=False)
    convs = mix_requests(a, system)
    sides = {}
    for side in ("off", "on"):
        llm = llms[side]
        t = time.perf_counter()
        outs = []
        for b in range(0, len(convs), a.batch):
            outs += llm.chat(convs[b:b + a.batch], sampling(a.mix_output_tokens), use_tqdm=False)
        dt = time.perf_counter() - t
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        cached = sum(o.num_cached_tokens for o in outs)
        sides[side] = {"wall_s": round(dt, 3), "prompt_tokens": prompt, "cached_tokens": cached,
                       "hit_rate": round(cached / prompt, 4) if prompt else 0.0,
                       "requests_with_hit": sum(1 for o in outs if o.num_cached_tokens > 0)}
        log(f"mix {side}: {sides[side]}")
    res["mix"] = {"summary": {"hit_rate": sides["on"]["hit_rate"],
                              "requests_with_hit": f"{sides['on']['requests_with_hit']}/{a.mix_requests}",
                              "wall_on_over_off": round(sides["on"]["wall_s"] / sides["off"]["wall_s"], 3)},
                  "sides": sides, "requests": a.mix_requests, "pool": a.mix_pool, "share": a.mix_share,
                  "batch": a.batch, "system_tokens": a.system_tokens}


# ---- output ----------------------------------------------------------------------------------------------------
def to_markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Prefix cache benchmark ({m['device_name']})", "",
             f"Model: {m['model_what']} (`{m['model']}`), {m['image_size']} px images ({m['image_tokens']} tokens), "
             f"torch {m['torch']}, transformers {m.get('transformers', '?')}, {m['started']}; "
             f"`{' '.join(m['argv'])}`.", ""]
    if m["device"] == "cpu":
        lines += ["CPU run (a smoke test): a tiny model's TTFT is fixed costs and scheduling noise, so the ratios "
                  "say nothing about the targets; they are for the GPU run.", ""]
    if "ttft" in res:
        t = res["ttft"]
        lines += ["## Multi-turn chat over one image: TTFT (median of runs)", "",
                  "| turn | prompt tokens | cached (on) | cache on | cache off | on / off | target <= 0.30 |",
                  "|---|---|---|---|---|---|---|"]
        for k, s in t["summary"].items():
            lines.append(f"| {k[-1]} | {s['prompt_tokens']} | {s['cached_tokens_on']} | {s['on_ms']:.1f} ms | "
                         f"{s['off_ms']:.1f} ms | {s['on_over_off']:.2f} | {'met' if s['met'] else 'NOT met'} |")
        lines.append("")
    if "unique" in res:
        s = res["unique"]["summary"]
        lines += ["## Nothing shared: throughput", "",
                  f"{res['unique']['requests']} requests x {res['unique']['output_tokens']} tokens, one batch, "
                  "unique prompts and images (embeddings cached beforehand).", "",
                  "| cache on | cache off | on / off | target >= 0.97 |", "|---|---|---|---|",
                  f"| {s['on_tok_s']:.1f} tok/s | {s['off_tok_s']:.1f} tok/s | {s['on_over_off']:.3f} | "
                  f"{'met' if s['met'] else 'NOT met'} |", ""]
    if "mix" in res:
        x = res["mix"]
        s, on, off = x["summary"], x["sides"]["on"], x["sides"]["off"]
        lines += ["## Mix: 80% repeat one of the pool's images after one system prompt", "",
                  f"{x['requests']} requests in batches of {x['batch']}, {int(x['share'] * 100)}% from a pool of "
                  f"{x['pool']} images, a {x['system_tokens']}-token system prompt.", "",
                  "| hit rate (tokens) | requests with a hit | wall on | wall off |", "|---|---|---|---|",
                  f"| {s['hit_rate'] * 100:.1f}% | {s['requests_with_hit']} | {on['wall_s']:.2f} s | "
                  f"{off['wall_s']:.2f} s |", ""]
    if res.get("skipped"):
        lines += ["Skipped: " + ", ".join(res["skipped"]), ""]
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prefix_cache_bench",
                   help="writes <out>.json and <out>.md")
    p.add_argument("--model", default=None, help="model dir (default: the 3B-sized random model, built if needed)")
    p.add_argument("--smoke", action="store_true", help="CPU smoke test: the tiny qwen2_5_vl model, small counts")
    p.add_argument("--device", default="auto", help="auto, cuda, cpu")
    p.add_argument("--sections", default="ttft,unique,mix")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--history-tokens", type=int, default=1000, help="turn 3's prompt tokens")
    p.add_argument("--answer-tokens", type=int, default=64, help="tokens of each canned assistant answer")
    p.add_argument("--repeats", type=int, default=5, help="conversations (ttft)")
    p.add_argument("--unique-requests", type=int, default=64)
    p.add_argument("--unique-output-tokens", type=int, default=64)
    p.add_argument("--unique-rounds", type=int, default=3)
    p.add_argument("--mix-requests", type=int, default=128)
    p.add_argument("--mix-pool", type=int, default=8)
    p.add_argument("--mix-share", type=float, default=0.8)
    p.add_argument("--mix-output-tokens", type=int, default=16)
    p.add_argument("--system-tokens", type=int, default=200)
    p.add_argument("--batch", type=int, default=16, help="requests per LLM.chat call (mix)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                   help="the GPU share of each LLM (two are alive: the second's cap is twice this)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--cpu-threads", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=1500.0, help="skip sections once this much time has passed")
    a = p.parse_args(argv)
    if a.smoke:
        defaults = {k: p.get_default(k) for k in SMOKE}
        for k, v in SMOKE.items():
            if getattr(a, k) == defaults[k]:  # explicit flags win over the smoke sizes
                setattr(a, k, v)
        if a.device == "auto":
            a.device = "cpu"
    a.sections = [s for s in a.sections.split(",") if s]
    bad = set(a.sections) - {"ttft", "unique", "mix"}
    if bad:
        p.error(f"unknown sections {sorted(bad)}")
    return a


def resolve_model(a, cuda: bool) -> str:
    if a.model:
        return a.model
    if a.smoke:
        from mmpipe.shared.models.tiny import ensure_tiny_model

        return str(ensure_tiny_model("qwen2_5_vl"))
    from build_3b_model import INFO_FILE, TEXT_3B, TEXT_SMALL, build_model

    path = Path(DEFAULT_3B_DIR if cuda else "/tmp/mmpipe-bench/qwen2_5_vl_small")
    try:
        built = json.loads((path / INFO_FILE).read_text())
    except (OSError, ValueError):
        built = {}
    if not (built.get("text") == (TEXT_3B if cuda else TEXT_SMALL) and (path / "config.json").exists()):
        build_model(path, small=not cuda)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch
    from transformers.utils.logging import disable_progress_bar

    from mmpipe import LLM

    disable_progress_bar()
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = a.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(a.cpu_threads)
    model = resolve_model(a, cuda)
    info_path = Path(model) / "mmpipe_bench_model.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    res: dict[str, Any] = {"meta": {
        "model": model, "model_what": info.get("what", Path(model).name), "device": a.device,
        "device_name": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "image_size": a.image_size, "argv": sys.argv[1:], "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S")}, "skipped": []}
    import transformers

    res["meta"]["transformers"] = transformers.__version__
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        a.out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
        a.out.with_suffix(".md").write_text(to_markdown(res))

    # gpu_memory_utilization caps the whole GPU (vLLM's meaning), so the second LLM's cap includes the first's share
    kw = dict(device=a.device, max_num_seqs=a.max_num_seqs)
    llms = {"on": LLM(model, enable_prefix_caching=True, gpu_memory_utilization=a.gpu_memory_utilization, **kw),
            "off": LLM(model, enable_prefix_caching=False,
                       gpu_memory_utilization=min(0.95, 2 * a.gpu_memory_utilization), **kw)}
    for side, llm in llms.items():  # warm-up: kernels, graphs, the allocator (not counted)
        timed_chat(llm, [user("Warm-up.", image(99, a.image_size))], n=4)
    _, outs = timed_chat(llms["off"], [user("x", image(98, a.image_size))])
    res["meta"]["image_tokens"] = outs[0].prompt_token_ids.count(llms["off"].adapter.placeholder_ids()["image"])
    log(f"model {model} on {a.device}; a {a.image_size} px image is {res['meta']['image_tokens']} tokens")
    sections = {"ttft": section_ttft, "unique": section_unique, "mix": section_mix}
    for name in a.sections:
        if time.monotonic() - T0 > a.budget_s:
            res["skipped"].append(name)
            log(f"skipping {name}: over --budget-s")
            continue
        t = time.monotonic()
        sections[name](llms, a, res)
        res[name]["section_s"] = round(time.monotonic() - t, 1)
        save()
        gc.collect()
    res["meta"]["total_s"] = round(time.monotonic() - T0, 1)
    save()
    print(to_markdown(res))
    log(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
