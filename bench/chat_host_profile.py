"""Host cost of one cached `LLM.chat` turn, stage by stage (issue 12's TTFT target, measured on the CPU).

    python bench/chat_host_profile.py                      # the tiny qwen2_5_vl model, 448 px image, ~1,000 tokens
    python bench/chat_host_profile.py --cprofile 40        # + the top 40 functions by own time (cProfile)

The TTFT of a turn whose prefill the prefix cache serves is mostly host work that does not depend on the
model's size (template, tokenisation, the image's embedding-cache hit, M-RoPE positions, block keys,
scheduling, one engine step, detokenisation). This runs bench/prefix_cache_bench.py's 3-turn conversation
(one image, a ~1,000-token history by turn 3; every conversation over its own image, turn 1 encodes it and is
not counted) on the CPU with the tiny qwen2_5_vl model, whose forward is a fraction of a millisecond, and
times each stage of turns 2 and 3 with wrappers around the functions that do it. Times are exclusive (a stage
nested in another is not counted twice); "other" is what no stage covers. Medians over --repeats
conversations, in ms per turn; the tiny model's forward ("engine: forward") stands for the GPU's ~1-3 ms.

Only what runs in-process is patched, and only while it runs; nothing in mmpipe reads these wrappers.
"""
from __future__ import annotations

import argparse
import functools
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


# (stage, owner, attribute): the owner is a module or a class; looked up lazily so the list reads top to bottom
def _targets() -> list[tuple[str, Any, str]]:
    import mmpipe.llm as llm_mod
    import mmpipe.shared.engine.model_runner as mr
    import mmpipe.shared.inputs.assemble as assemble
    import mmpipe.shared.media.loader as loader
    import mmpipe.shared.runner as runner
    from mmpipe.shared.detokenizer import IncrementalDetokenizer
    from mmpipe.shared.engine.block_manager import BlockManager
    from mmpipe.shared.engine.llm_engine import LLMEngine
    from mmpipe.shared.engine.model_runner import ModelRunner
    from mmpipe.shared.engine.sampler import Sampler
    from mmpipe.shared.engine.scheduler import Scheduler
    from mmpipe.shared.engine.sequence import Sequence
    from mmpipe.shared.inputs.media_settings import SettingsSpace
    from mmpipe.shared.inputs.resolve import EmbeddingResolver
    from mmpipe.shared.inputs.tokenize import PromptTokenizer
    from mmpipe.shared.models.base import ModelAdapter
    from mmpipe.shared.models.qwen_vl import Qwen2VLAdapter

    return [
        ("chat: total (other)", llm_mod.LLM, "chat"),
        ("chat: settings", SettingsSpace, "resolve"),
        ("chat: template resolve", llm_mod, "resolve_template"),
        ("chat: tools plan", llm_mod, "parse_tool_request"),
        ("chat: parse messages", llm_mod, "parse_messages"),
        ("chat: template render", llm_mod, "apply_template"),
        ("chat: item refs", llm_mod, "chat_item_refs"),
        ("chat: tokenize (split, memo)", PromptTokenizer, "encode"),
        ("chat: tokenize (tokenizer call)", type(_TOKENIZER[0]), "__call__"),
        ("run: placeholder check", llm_mod.LLM, "_check"),
        ("run (other): output building", llm_mod.LLM, "_run"),
        ("resolve (other): keys", EmbeddingResolver, "resolve_keyed"),
        ("resolve: decode budget", SettingsSpace, "budget"),
        ("media: load", loader.MediaLoader, "load"),
        ("media: hash", loader, "hash_image"),
        ("resolve: embedding cache lookup", EmbeddingResolver, "_lookup"),
        ("resolve: HF processor", ModelAdapter, "preprocess"),
        ("resolve: encode", ModelAdapter, "encode"),
        ("request: build (other)", llm_mod, "build_engine_request"),
        ("request: expand placeholders", assemble, "expand_prompt"),
        ("request: M-RoPE positions", Qwen2VLAdapter, "mrope_positions"),
        ("engine: add_request (other)", LLMEngine, "add_request"),
        ("engine: validate", LLMEngine, "validate_request"),
        ("engine: Sequence()", Sequence, "__init__"),
        ("loop (other)", runner, "run_to_completion"),
        ("engine: step (other)", LLMEngine, "step"),
        ("engine: schedule", Scheduler, "schedule"),
        ("engine: block keys", BlockManager, "_block_keys"),
        ("engine: staging + eager plan", ModelRunner, "_run_eager"),
        ("engine: forward", ModelRunner, "run_plan"),
        ("engine: sample", Sampler, "__call__"),
        ("detokenize", IncrementalDetokenizer, "add_tokens"),
        ("detokenize: setup", IncrementalDetokenizer, "__init__"),
    ]


_TOKENIZER: list[Any] = []


def patch(timer: StageTimer) -> Callable[[], None]:
    undo = []
    for name, owner, attr in _targets():
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir (default: the tiny qwen2_5_vl test model)")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--history-tokens", type=int, default=1000)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30, help="conversations measured")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-prefix-cache", action="store_true", help="measure the cache-off side instead")
    p.add_argument("--cprofile", type=int, default=0, help="also print the top N functions by own time")
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
    llm = LLM(a.model, device="cpu", enable_prefix_caching=not a.no_prefix_cache, max_model_len=4096)
    _TOKENIZER.append(llm.tokenizer)
    ns = argparse.Namespace(answer_tokens=a.answer_tokens, image_size=a.image_size, history_tokens=a.history_tokens)
    context, answer = pcb.calibrate_context(llm, ns)
    for r in range(3):  # warm-up: allocator, tokenizer caches, first-call paths
        turns = pcb.conversation(-10 - r, pcb.image(500 + r, a.image_size), context, answer)
        for t in turns:
            pcb.timed_chat(llm, t)

    timer = StageTimer()
    restore = patch(timer)
    per_turn: dict[int, list[dict[str, float]]] = {2: [], 3: []}
    walls: dict[int, list[float]] = {2: [], 3: []}
    info: dict[int, tuple[int, int]] = {}
    prof = None
    if a.cprofile:
        import cProfile

        prof = cProfile.Profile()
    try:
        for r in range(a.repeats):
            turns = pcb.conversation(r, pcb.image(1000 + r, a.image_size), context, answer)
            pcb.timed_chat(llm, turns[0])
            timer.take()
            for t in (2, 3):
                if prof is not None:
                    prof.enable()
                dt, outs = pcb.timed_chat(llm, turns[t - 1])
                if prof is not None:
                    prof.disable()
                walls[t].append(dt * 1e3)
                per_turn[t].append({k: v * 1e3 for k, v in timer.take().items()})
                info[t] = (len(outs[0].prompt_token_ids), outs[0].num_cached_tokens)
    finally:
        restore()

    stages = [name for name, _, _ in _targets()]
    print(f"# Host ms per cached LLM.chat turn (CPU, {torch.get_num_threads()} thread(s); model {a.model}; "
          f"prefix cache {'off' if a.no_prefix_cache else 'on'}; {a.repeats} conversations, median)")
    for t in (2, 3):
        print(f"turn {t}: {info[t][0]} prompt tokens, {info[t][1]} cached")
    print(f"{'stage':38s} {'turn 2':>8s} {'turn 3':>8s}")
    rows = []
    for s in stages:
        med = [statistics.median(d.get(s, 0.0) for d in per_turn[t]) for t in (2, 3)]
        rows.append((s, med))
    for s, (m2, m3) in sorted(rows, key=lambda r: -r[1][1]):
        print(f"{s:38s} {m2:8.3f} {m3:8.3f}")
    print(f"{'WALL (LLM.chat)':38s} {statistics.median(walls[2]):8.3f} {statistics.median(walls[3]):8.3f}")
    fw = [statistics.median(d.get('engine: forward', 0.0) for d in per_turn[t]) for t in (2, 3)]
    print(f"{'WALL minus the forward':38s} {statistics.median(walls[2]) - fw[0]:8.3f} "
          f"{statistics.median(walls[3]) - fw[1]:8.3f}")
    if prof is not None:
        import pstats

        pstats.Stats(prof).sort_stats("tottime").print_stats(a.cprofile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
