"""Host cost of one cached `LLM.chat` turn, stage by stage (issue 12's TTFT target, measured on the CPU).

    python bench/chat_host_profile.py                      # the tiny qwen2_5_vl model, 448 px image, ~1,000 tokens
    python bench/chat_host_profile.py --cprofile 40        # + the top 40 functions by own time (cProfile)

The TTFT of a turn whose prefill the prefix cache serves is mostly host work that does not depend on the
model's size (template, tokenisation, the image's embedding-cache hit, M-RoPE positions, block keys,
scheduling, one engine step, detokenisation). This runs bench/prefix_cache_bench.py's 3-turn conversation
(one image, a ~1,000-token history by turn 3; every conversation over its own image, turn 1 encodes it and is
not counted) on the CPU with the tiny qwen2_5_vl model, whose forward is a fraction of a millisecond, and
times turns 2 and 3 in two passes of --repeats conversations each: the first unpatched (the wall time of
`LLM.chat`, as prefix_cache_bench.py takes it, and the process CPU time), the second with wrappers around the
functions that do each stage. Stage times are exclusive (a stage nested in another is not counted twice);
"other" is what no stage covers. HOST is each turn's wall time less its "engine: forward" (the tiny model's
forward stands for the GPU's ~1-3 ms). Medians, in ms per turn.

    git archive <commit> | tar -x -C /tmp/base && cp bench/chat_host_profile.py /tmp/base/bench/
    PYTHONPATH=/tmp/base python /tmp/base/bench/chat_host_profile.py   # the same harness on the older tree

Only what runs in-process is patched, and only while it runs; nothing in mmpipe reads these wrappers.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


class StageTimer:
    """Exclusive wall time per stage: a stage's children are subtracted from it."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []  # [name, start, child time]

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*a: Any, **kw: Any) -> Any:
            frame = [name, time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*a, **kw)
            finally:
                self._stack.pop()
                dt = time.perf_counter() - frame[1]
                self.totals[name] += dt - frame[2]
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1][2] += dt
        return timed

    def take(self) -> dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        self.calls.clear()
        return out


# (stage, module, attribute path): what each stage's time is the exclusive time of. Targets an older tree lacks
# are skipped, so the same harness measures the code before a change (run it with PYTHONPATH on that tree).
TARGETS = [
    ("chat: total (other)", "mmpipe.llm", "LLM.chat"),
    ("chat: settings", "mmpipe.shared.inputs.media_settings", "SettingsSpace.resolve"),
    ("chat: template resolve", "mmpipe.llm", "resolve_template"),
    ("chat: tools plan", "mmpipe.llm", "parse_tool_request"),
    ("chat: parse messages", "mmpipe.llm", "parse_messages"),
    ("chat: template render", "mmpipe.llm", "apply_template"),
    ("chat: item refs", "mmpipe.llm", "chat_item_refs"),
    ("chat: tokenize (split, memo)", "mmpipe.shared.inputs.tokenize", "PromptTokenizer.encode"),
    ("chat: tokenize (tokenizer call)", "<tokenizer>", "__call__"),
    ("run: placeholder check", "mmpipe.llm", "LLM._check"),
    ("run (other): output building", "mmpipe.llm", "LLM._run"),
    ("resolve (other): keys", "mmpipe.shared.inputs.resolve", "EmbeddingResolver.resolve_keyed"),
    ("resolve: decode budget", "mmpipe.shared.inputs.media_settings", "SettingsSpace.budget"),
    ("media: load (fetch, decode)", "mmpipe.shared.media.loader", "MediaLoader.load"),
    ("media: hash", "mmpipe.shared.media.loader", "hash_image"),
    ("resolve: embedding cache lookup", "mmpipe.shared.inputs.resolve", "EmbeddingResolver._lookup"),
    ("resolve: HF processor", "mmpipe.shared.models.base", "ModelAdapter.preprocess"),
    ("resolve: encode", "mmpipe.shared.models.base", "ModelAdapter.encode"),
    ("request: build (other)", "mmpipe.llm", "build_engine_request"),
    ("request: expand placeholders", "mmpipe.shared.inputs.assemble", "expand_prompt"),
    ("request: M-RoPE positions", "mmpipe.shared.models.qwen_vl", "Qwen2VLAdapter.mrope_positions"),
    ("engine: add_request (other)", "mmpipe.shared.engine.llm_engine", "LLMEngine.add_request"),
    ("engine: validate", "mmpipe.shared.engine.llm_engine", "LLMEngine.validate_request"),
    ("engine: Sequence()", "mmpipe.shared.engine.sequence", "Sequence.__init__"),
    ("loop (other)", "mmpipe.shared.runner", "run_to_completion"),
    ("engine: step (other)", "mmpipe.shared.engine.llm_engine", "LLMEngine.step"),
    ("engine: schedule", "mmpipe.shared.engine.scheduler", "Scheduler.schedule"),
    ("engine: block keys", "mmpipe.shared.engine.block_manager", "BlockManager._block_keys"),
    ("engine: staging + eager plan", "mmpipe.shared.engine.model_runner", "ModelRunner._run_eager"),
    ("engine: graph step (other)", "mmpipe.shared.engine.mixed_graphs", "MixedGraphs.run"),
    ("engine: graph staging + upload", "mmpipe.shared.engine.mixed_graphs", "MixedGraphs._fill"),
    ("engine: embed (eager, before a graph replay)", "mmpipe.shared.engine.decoder", "PagedDecoder.embed"),
    ("engine: graph replay (launch)", "mmpipe.shared.engine.cuda_graphs", "StepGraphs.replay"),
    ("engine: forward", "mmpipe.shared.engine.model_runner", "ModelRunner.run_plan"),
    ("engine: sample", "mmpipe.shared.engine.sampler", "Sampler.__call__"),
    ("detokenize", "mmpipe.shared.detokenizer", "IncrementalDetokenizer.add_tokens"),
    ("detokenize: setup", "mmpipe.shared.detokenizer", "IncrementalDetokenizer.__init__"),
]


def _targets(tokenizer: Any, targets: list[tuple[str, str, str]] | None = None) -> list[tuple[str, Any, str]]:
    """(stage, owner, attribute) of the targets this tree has; the owner is a module or a class."""
    import importlib

    out = []
    for name, module, path in TARGETS if targets is None else targets:
        try:
            owner: Any = type(tokenizer) if module == "<tokenizer>" else importlib.import_module(module)
            *classes, attr = path.split(".")
            for c in classes:
                owner = getattr(owner, c)
            getattr(owner, attr)
        except (ImportError, AttributeError):
            continue
        out.append((name, owner, attr))
    return out


def patch(timer: StageTimer, tokenizer: Any, targets: list[tuple[str, str, str]] | None = None) -> Callable[[], None]:
    """Wrap every target (default TARGETS) in `timer`; returns the function that takes the wrappers off."""
    undo = []
    for name, owner, attr in _targets(tokenizer, targets):
        own = attr in vars(owner)  # an inherited method is shadowed, then the shadow removed
        orig = getattr(owner, attr)
        setattr(owner, attr, timer.wrap(name, orig))
        undo.append((owner, attr, orig, own))

    def restore() -> None:
        for owner, attr, orig, own in reversed(undo):
            if own:
                setattr(owner, attr, orig)
            else:
                delattr(owner, attr)
    return restore


def as_data_url(turns: list[list[dict]]) -> list[list[dict]]:
    """The same turns with each image_pil part a PNG data: URL (encoded once: every turn sends the same string)."""
    import base64
    import io

    urls: dict[int, str] = {}

    def part(c: dict) -> dict:
        if c.get("type") != "image_pil":
            return c
        img = c["image_pil"]
        if id(img) not in urls:
            buf = io.BytesIO()
            img.save(buf, "PNG")
            urls[id(img)] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return {"type": "image_url", "image_url": {"url": urls[id(img)]}}

    return [[{**m, "content": [part(c) for c in m["content"]]} if isinstance(m["content"], list) else m
             for m in turn] for turn in turns]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir (default: the tiny qwen2_5_vl test model)")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--history-tokens", type=int, default=1000)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30, help="conversations measured")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the 3B-sized model on a GPU (the stages are "
                                                   "host times: 'engine: sample' then holds the wait for the GPU)")
    p.add_argument("--no-prefix-cache", action="store_true", help="measure the cache-off side instead")
    p.add_argument("--image-source", choices=("pil", "data-url"), default="pil",
                   help="the image as prefix_cache_bench.py sends it (a PIL image), or as a PNG data: URL every "
                        "turn (what an OpenAI client sends the server)")
    p.add_argument("--cprofile", type=int, default=0, help="also print the top N functions by own time")
    p.add_argument("--json", default=None, help="also write the medians to this file")
    a = p.parse_args(argv)

    import torch
    from transformers.utils.logging import disable_progress_bar

    import prefix_cache_bench as pcb
    from mmpipe import LLM

    disable_progress_bar()
    torch.set_num_threads(a.threads)
    if a.model is None:
        from mmpipe.shared.models.tiny import ensure_tiny_model

        a.model = str(ensure_tiny_model("qwen2_5_vl"))
    llm = LLM(a.model, device=a.device, enable_prefix_caching=not a.no_prefix_cache, max_model_len=4096)
    ns = argparse.Namespace(answer_tokens=a.answer_tokens, image_size=a.image_size, history_tokens=a.history_tokens)
    context, answer = pcb.calibrate_context(llm, ns)
    for r in range(3):  # warm-up: allocator, tokenizer caches, first-call paths
        turns = pcb.conversation(-10 - r, pcb.image(500 + r, a.image_size), context, answer)
        turns = as_data_url(turns) if a.image_source == "data-url" else turns
        for t in turns:
            pcb.timed_chat(llm, t)

    def conversations(first: int):
        for r in range(first, first + a.repeats):
            turns = pcb.conversation(r, pcb.image(1000 + r, a.image_size), context, answer)
            yield as_data_url(turns) if a.image_source == "data-url" else turns

    # pass 1, nothing patched: the wall time of each turn, as prefix_cache_bench.py measures it
    plain: dict[int, list[float]] = {2: [], 3: []}
    cpu: dict[int, list[float]] = {2: [], 3: []}
    for turns in conversations(0):
        pcb.timed_chat(llm, turns[0])  # turn 1: encodes the image (not counted)
        for t in (2, 3):
            c = time.process_time()
            dt, _ = pcb.timed_chat(llm, turns[t - 1])
            cpu[t].append((time.process_time() - c) * 1e3)
            plain[t].append(dt * 1e3)

    # pass 2, other images: each stage's exclusive time
    timer = StageTimer()
    restore = patch(timer, llm.tokenizer)
    per_turn: dict[int, list[dict[str, float]]] = {2: [], 3: []}
    host: dict[int, list[float]] = {2: [], 3: []}
    info: dict[int, tuple[int, int]] = {}
    prof = None
    if a.cprofile:
        import cProfile

        prof = cProfile.Profile()
    try:
        for turns in conversations(a.repeats):
            pcb.timed_chat(llm, turns[0])
            timer.take()
            for t in (2, 3):
                if prof is not None:
                    prof.enable()
                dt, outs = pcb.timed_chat(llm, turns[t - 1])
                if prof is not None:
                    prof.disable()
                stages_ms = {k: v * 1e3 for k, v in timer.take().items()}
                per_turn[t].append(stages_ms)
                host[t].append(dt * 1e3 - stages_ms.get("engine: forward", 0.0))
                info[t] = (len(outs[0].prompt_token_ids), outs[0].num_cached_tokens)
    finally:
        restore()

    med = statistics.median
    stages = [name for name, _, _ in TARGETS]
    print(f"# Host ms per cached LLM.chat turn (CPU, {torch.get_num_threads()} torch thread(s); model {a.model}; "
          f"prefix cache {'off' if a.no_prefix_cache else 'on'}; image as {a.image_source}; {a.repeats} "
          f"conversations a pass, medians)")
    for t in (2, 3):
        print(f"turn {t}: {info[t][0]} prompt tokens, {info[t][1]} cached")
    print(f"{'stage (exclusive ms)':38s} {'turn 2':>8s} {'turn 3':>8s}")
    rows = [(s, [med(d.get(s, 0.0) for d in per_turn[t]) for t in (2, 3)]) for s in stages]
    for s, (m2, m3) in sorted(rows, key=lambda r: -r[1][1]):
        print(f"{s:38s} {m2:8.3f} {m3:8.3f}")
    summary = {"wall_ms": [med(plain[t]) for t in (2, 3)], "process_cpu_ms": [med(cpu[t]) for t in (2, 3)],
               "host_ms": [med(host[t]) for t in (2, 3)]}
    print(f"{'WALL, unpatched pass (LLM.chat)':38s} {summary['wall_ms'][0]:8.3f} {summary['wall_ms'][1]:8.3f}")
    print(f"{'process CPU, unpatched pass':38s} {summary['process_cpu_ms'][0]:8.3f} "
          f"{summary['process_cpu_ms'][1]:8.3f}")
    print(f"{'HOST = wall - forward (patched pass)':38s} {summary['host_ms'][0]:8.3f} {summary['host_ms'][1]:8.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "summary": summary, "info": info,
                                            "stages": {s: v for s, v in rows}}, indent=1, default=str))
    if prof is not None:
        import pstats

        pstats.Stats(prof).sort_stats("tottime").print_stats(a.cprofile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
