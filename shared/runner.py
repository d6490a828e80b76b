"""Drive an engine until a batch of requests is finished (the offline API's loop), with progress.

The engine produces token ids; this loop turns them into text with the incremental detokenizer, stops a
sequence on a stop string (aborting it in the engine so its KV blocks are freed at once) and collects
RequestOutputs. Streaming servers use the same detokenizer per request instead of this loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmpipe.shared.detokenizer import IncrementalDetokenizer
from mmpipe.shared.types import EngineRequest


@dataclass
class FinishedSequence:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list | None = None  # with sampling.prompt_logprobs (StepOutput.prompt_logprobs)
    num_cached_tokens: int = 0  # prompt tokens served from the engine's prefix cache


def run_to_completion(engine: Any, requests: list[EngineRequest], tokenizer: Any, *,
                      use_tqdm: bool = True) -> dict[str, FinishedSequence]:
    detoks = {r.request_id: IncrementalDetokenizer(tokenizer, r.sampling) for r in requests}
    results = {r.request_id: FinishedSequence(logprobs=[] if r.sampling.logprobs is not None else None,
                                              top_logprobs=[] if r.sampling.logprobs else None)
               for r in requests}
    pending = set(detoks)
    for r in requests:
        engine.add_request(r)
    bar = _progress(len(requests), use_tqdm)
    try:
        while pending:
            if not engine.has_unfinished_requests():
                raise RuntimeError(f"engine went idle with {len(pending)} request(s) unfinished")
            for out in engine.step():
                rid = out.request_id
                if rid not in pending:
                    continue
                res = results[rid]
                res.num_cached_tokens = out.num_cached_tokens
                res.token_ids.extend(out.new_token_ids)
                if out.prompt_logprobs is not None:
                    res.prompt_logprobs = out.prompt_logprobs
                if res.logprobs is not None and out.logprobs:
                    res.logprobs.extend(out.logprobs)
                if res.top_logprobs is not None and out.top_logprobs:
                    res.top_logprobs.extend(out.top_logprobs)
                stopped = detoks[rid].add_tokens(out.new_token_ids)
                if stopped and not out.finished:
                    engine.abort_request(rid)
                if stopped or out.finished:
                    d = detoks[rid]
                    res.text = d.output_text
                    res.finish_reason = "stop" if stopped else out.finish_reason
                    if stopped and d.stop_token_count is not None:
                        # tokens after the one that completed the stop string are not part of the output
                        del res.token_ids[d.stop_token_count:]
                        if res.logprobs is not None:
                            del res.logprobs[d.stop_token_count:]
                        if res.top_logprobs is not None:
                            del res.top_logprobs[d.stop_token_count:]
                    pending.discard(rid)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", unit="req", dynamic_ncols=True)
