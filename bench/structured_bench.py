"""What structured outputs cost per decode step: every request under a JSON schema, against none (issue 11).

    python bench/structured_bench.py --model DIR --out bench/results/structured_bench     # GPU, ~1-2 min
    python bench/structured_bench.py --model DIR --device cpu --batches 1,4 --tokens 16   # CPU smoke

The offline `mmpipe.LLM` on text prompts, greedy, `--tokens` new tokens each, at each batch size of `--batches`
(default 1 and 64), in one process: first without a grammar, then with every request under `--schema` (default:
an object whose one string field takes the whole budget, so a random-weight model keeps generating inside the
grammar instead of closing it early). Per configuration: wall time of `LLM.generate` over `--repeats` runs
(median), the decode steps (the longest output, since the batch steps together), ms per step and output
tokens/s; the ratio with / without is the cost of the token masks (llguidance computes them on the host while
the GPU runs the step; shared/structured/). Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

STAGES = [  # (stage, module, attribute): exclusive host time per decode step
    ("engine: step (other)", "mmpipe.shared.engine.llm_engine", "LLMEngine.step"),
    ("engine: schedule", "mmpipe.shared.engine.scheduler", "Scheduler.schedule"),
    ("engine: execute (other)", "mmpipe.shared.engine.model_runner", "ModelRunner.execute"),
    ("engine: sample (other; GPU wait)", "mmpipe.shared.engine.sampler", "Sampler.__call__"),
    ("grammar: add (matcher)", "mmpipe.shared.structured.masks", "StructuredOutputs.add"),
    ("grammar: advance", "mmpipe.shared.structured.masks", "StructuredOutputs.advance"),
    ("grammar: prefetch", "mmpipe.shared.structured.masks", "StructuredOutputs.prefetch"),
    ("grammar: fill (waits for the prefetch)", "mmpipe.shared.structured.masks", "StructuredOutputs.fill"),
    ("grammar: apply mask", "mmpipe.shared.engine.sampler", "apply_grammar_mask"),
    ("run loop (other)", "mmpipe.shared.runner", "run_to_completion"),
]
DEFAULT_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def log(*a: Any) -> None:
    print(f"[structured_bench {time.strftime('%H:%M:%S')}]", *a, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="bench/results/structured_bench")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--schema", default=None, help="a JSON schema (default: one long string field)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--stages", action="store_true", help="also a run with the host stages timed")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="experiment: no background mask computation (each step's fill computes its masks)")
    args = ap.parse_args(argv)
    import torch

    from mmpipe import LLM, SamplingParams
    from mmpipe.shared.structured.params import StructuredOutputsParams

    if args.no_prefetch:
        from mmpipe.shared.structured.masks import StructuredOutputs

        StructuredOutputs.prefetch = lambda self, seqs: None  # fill() then computes every mask itself
    schema = json.loads(args.schema) if args.schema else DEFAULT_SCHEMA
    batches = [int(x) for x in args.batches.split(",") if x]
    llm = LLM(args.model, device=args.device, gpu_memory_utilization=args.gpu_memory_utilization,
              max_num_seqs=max(64, max(batches)), enable_prefix_caching=False)
    cuda = str(llm.adapter.device).startswith("cuda")
    res: dict[str, Any] = {"model": args.model, "device": str(llm.adapter.device), "prefetch": not args.no_prefetch,
                           "gpu": torch.cuda.get_device_name(0) if cuda else None, "tokens": args.tokens,
                           "schema": schema, "rows": []}

    def run(n: int, grammar: bool) -> dict[str, Any]:
        so = StructuredOutputsParams(json=schema) if grammar else None
        sp = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=not grammar, structured_outputs=so)
        prompts = [f"Write a JSON object about the number {i}:" for i in range(n)]
        llm.generate(prompts[:2], sp, use_tqdm=False)  # warm-up (the grammar compiles here)
        walls, steps, toks = [], [], []
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            if cuda:
                torch.cuda.synchronize()
            walls.append(time.perf_counter() - t)
            lens = [len(o.outputs[0].token_ids) for o in outs]
            steps.append(max(lens))
            toks.append(sum(lens))
        i = walls.index(statistics.median_low(walls))
        row = {"batch": n, "grammar": grammar, "wall_s": round(walls[i], 4), "steps": steps[i],
               "out_tokens": toks[i], "ms_per_step": round(1e3 * walls[i] / max(1, steps[i]), 3),
               "out_tok_s": round(toks[i] / walls[i], 1)}
        if grammar:  # every answer must parse and hold the schema's field
            row["valid"] = sum(_valid(o.outputs[0].text) for o in outs)
        if args.stages:
            row["stages_ms_per_step"] = timed_stages(lambda: llm.generate(prompts, sp, use_tqdm=False))
        log(row)
        return row

    def timed_stages(fn) -> dict[str, float]:
        from chat_host_profile import StageTimer, patch

        timer = StageTimer()
        restore = patch(timer, llm.tokenizer, STAGES)
        try:
            outs = fn()
        finally:
            restore()
        steps = max(len(o.outputs[0].token_ids) for o in outs)
        return {k: round(1e3 * v / steps, 4) for k, v in sorted(timer.take().items(), key=lambda kv: -kv[1])}

    for n in batches:
        off, on = run(n, False), run(n, True)
        on["ratio_ms_per_step"] = round(on["ms_per_step"] / off["ms_per_step"], 3)
        res["rows"] += [off, on]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    lines = [f"# Structured outputs: cost per decode step ({res['gpu'] or res['device']})", "",
             f"`{args.model}`, greedy, {args.tokens} new tokens, prefill included in the wall time; schema "
             f"`{json.dumps(schema)}`.", "",
             "| batch | grammar | wall s | steps | ms / step | out tok/s | with / without | valid |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['batch']} | {'json schema' if r['grammar'] else 'none'} | {r['wall_s']} | {r['steps']} | "
                     f"{r['ms_per_step']} | {r['out_tok_s']} | {r.get('ratio_ms_per_step', '')} | "
                     f"{r.get('valid', '')} |")
    if args.stages:
        lines += ["", "Host stages, exclusive ms per step (a run of its own, wrappers on):", "",
                  "| stage | " + " | ".join(f"batch {r['batch']} {'grammar' if r['grammar'] else 'none'}"
                                            for r in res["rows"]) + " |",
                  "|---|" + "---:|" * len(res["rows"])]
        names = list(dict.fromkeys(k for r in res["rows"] for k in r["stages_ms_per_step"]))
        for k in names:
            lines.append(f"| {k} | " + " | ".join(str(r["stages_ms_per_step"].get(k, "")) for r in res["rows"]) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _valid(text: str) -> bool:
    """A cut-off answer (the token budget ended inside the string) is not complete JSON; count only whole ones."""
    try:
        return isinstance(json.loads(text).get("answer"), str)
    except (ValueError, AttributeError):
        return False


if __name__ == "__main__":
    sys.exit(main())
