"""Run under TRITON_INTERPRET=1 (by test_engine_triton_interp.py): the engine's CUDA path on the CPU.

The triton backend's kernels run in Triton's interpreter, and the CUDA-graph classes run their static-shape
forward eagerly on the same buffers they would capture, so this checks the kernels, the graph input staging
and the padding against HF `generate`, for each family named on the command line: staggered arrivals,
chunked prefill cutting through the first image / audio span, preemption with recompute, mixed-step
graphs off (decode graphs only) and all graphs off (prefix caching on, the default, in all of them), and
prefix-cache hits: a prompt repeated in the same step (the prefill kernel reads blocks written in that step)
and again later, on the graphs' static staging; and ("mistral3") an all-sliding model whose blocks behind the
window are given back, so the static tables hold FREED_BLOCK entries. Exits non-zero on the first mismatch. A
family in `SUBSET` runs only those configs: the sparse-MoE decoder adds its router and grouped experts to the same staging, so chunked
prefill (decode graphs, mixed graphs, and the eager steps that carry DeepStack rows) and preemption cover what it
changes, in 2/5 of the time."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from engine_helpers import first_mm_span, get_case, run_engine  # noqa: E402

from mmpipe.shared.engine import EngineConfig, LLMEngine  # noqa: E402
from mmpipe.shared.engine.block_manager import cdiv  # noqa: E402
from mmpipe.shared.types import SamplingParams  # noqa: E402


SUBSET = {"qwen3_vl_moe": ("mixed graphs, chunk inside the media span", "mixed graphs, preemption")}


def check(family: str) -> None:
    case = get_case(family)
    a, b, c = case.prompts
    start, n = first_mm_span(a)
    longest = max(len(p.token_ids) for p in case.prompts) + len(a.ref)
    preempt_blocks = max(cdiv(len(a.token_ids), 4) + cdiv(len(b.token_ids), 4) + 1, cdiv(longest, 4))
    configs = {
        "mixed graphs, chunk inside the media span": EngineConfig(
            attention_backend="triton", max_num_seqs=4, block_size=8, max_num_batched_tokens=start + max(1, n // 2)),
        "mixed graphs, preemption": EngineConfig(
            attention_backend="triton", max_num_seqs=4, block_size=4, num_kv_blocks=preempt_blocks,
            max_num_batched_tokens=64),
        "decode graphs only": EngineConfig(attention_backend="triton", max_num_seqs=4, mixed_graph_max_prefills=0),
        "no graphs": EngineConfig(attention_backend="triton", max_num_seqs=4, enable_cuda_graphs=False),
        "prefix cache hits": EngineConfig(attention_backend="triton", max_num_seqs=4, block_size=4),
    }
    for name, cfg in configs.items():
        if name not in SUBSET.get(family, configs):
            continue
        engine = LLMEngine(case.model, cfg)
        arrivals = {0: [a.request("a")], 1: [b.request("b", SamplingParams(max_tokens=9, temperature=0.0))],
                    3: [c.request("c")]}
        if "preemption" in name:
            arrivals = {0: [a.request("a"), b.request("b", SamplingParams(max_tokens=9, temperature=0.0)),
                            c.request("c")]}
        if "prefix" in name:  # a (its media keyed) again in a's step and later: whole-prompt hits
            arrivals[0] = [a.request(rid, mm_spans=a.mm_spans()) for rid in ("a", "a2")]
            arrivals[4] = [a.request("a3", mm_spans=a.mm_spans())]
        res = run_engine(engine, arrivals)
        if "prefix" in name:
            hit = (len(a.token_ids) - 1) // 4 * 4
            assert res.cached["a"] == 0 and res.cached["a2"] == res.cached["a3"] == hit, (family, res.cached)
            assert res.tokens["a2"] == res.tokens["a3"] == a.ref, (family, name)
        for rid, p, k in (("a", a, None), ("b", b, 9), ("c", c, None)):
            want = p.ref if k is None else p.ref[:k]
            assert res.tokens[rid] == want, f"{family} / {name} / {rid}: {res.tokens[rid]} != {want}"
        stats, info = engine.stats, engine.kv_cache_info()
        # DeepStack: a step with image rows runs eagerly; with all three prompts admitted at once every prefill
        # step of the preemption config carries some
        all_rows_eager = "preemption" in name and engine.runner.decoder.num_deepstack
        if cfg.enable_cuda_graphs:
            assert stats["graph_steps"] > 0, (family, name, stats)
            if not all_rows_eager:
                assert (stats["mixed_graph_steps"] > 0) == (cfg.mixed_graph_max_prefills > 0), (family, name, stats)
                if not engine.runner.decoder.num_deepstack:  # steps of prefills alone: the prefill-only graphs
                    assert (stats["prefill_graph_steps"] > 0) == (cfg.mixed_graph_max_prefills > 0), (family, name,
                                                                                                      stats)
        if "preemption" in name:
            assert info["num_preemptions"] > 0, (family, name, info)
        assert info["free_blocks"] == info["num_blocks"], (family, name, info)
        print(f"ok {family} / {name}: {stats}", flush=True)


def check_windowed() -> None:
    """The tiny Mistral 3, every layer windowed: its KV blocks behind the window are given back mid-sequence
    (window.py), so the kernels and both graph kinds' static block tables run with FREED_BLOCK entries; text
    prompts longer than the window (test_window_kv.py's), against HF `generate`."""
    import tempfile
    from pathlib import Path

    from engine_helpers import _load
    from offline_helpers import chat_prompt, hf_generate
    from test_window_kv import OUT, TEXTS

    from mmpipe.shared.models.tiny import build_tiny_model
    from mmpipe.shared.types import EngineRequest

    tmp = tempfile.TemporaryDirectory(prefix="mmpipe-interp-window-")
    path = build_tiny_model("mistral3", Path(tmp.name) / "mistral3")
    model, processor = _load(path)
    prompts = [chat_prompt(path, [{"role": "user", "content": t}]) for t in TEXTS]
    refs = [hf_generate(path, p, max_new_tokens=OUT, add_special_tokens=False) for p in prompts]
    ids = [processor.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    greedy = SamplingParams(temperature=0, max_tokens=OUT, ignore_eos=True)
    configs = {
        "mixed graphs, tiny cache": EngineConfig(attention_backend="triton", max_num_seqs=4, block_size=4,
                                                 num_kv_blocks=10, max_num_batched_tokens=16),
        "decode graphs only, prefix cache hits": EngineConfig(attention_backend="triton", max_num_seqs=4,
                                                              block_size=8, num_kv_blocks=32,
                                                              mixed_graph_max_prefills=0),
    }
    for name, cfg in configs.items():
        engine = LLMEngine(model, cfg)
        arrivals = {0: [EngineRequest(str(i), t, greedy) for i, t in enumerate(ids)]}
        if "prefix" in name:
            arrivals[30] = [EngineRequest("again", ids[1], greedy)]
        res = run_engine(engine, arrivals)
        for i, ref in enumerate(refs):
            assert res.tokens[str(i)] == ref, f"mistral3 / {name} / {i}: {res.tokens[str(i)]} != {ref}"
        if "prefix" in name:
            assert res.tokens["again"] == refs[1] and res.cached["again"] > 0, (name, res.cached)
        stats, info = engine.stats, engine.kv_cache_info()
        assert stats["window_freed_blocks"] > 0 and stats["graph_steps"] > 0, (name, stats)
        assert (stats["mixed_graph_steps"] > 0) == (cfg.mixed_graph_max_prefills > 0), (name, stats)
        assert (stats["prefill_graph_steps"] > 0) == (cfg.mixed_graph_max_prefills > 0), (name, stats)
        assert info["free_blocks"] == info["num_blocks"], (name, info)
        print(f"ok mistral3 / {name}: {stats}", flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))  # its share of the cores (background_runs.py)
    for fam in sys.argv[1:]:
        check_windowed() if fam == "mistral3" else check(fam)
