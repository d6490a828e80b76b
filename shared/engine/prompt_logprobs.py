"""prompt_logprobs (vLLM's extra): the logprob of every prompt token given the ones before it, with its top
alternatives, from the logits of the prompt positions that a step computes.

A prompt token i >= 1 is predicted by the logits at position i - 1, so a prefill chunk [s, e) of a request that
asked for them contributes positions s .. min(e, L - 1) - 1 (the last prompt position predicts the first output
token and is sampled as usual). Such steps run eagerly with those rows appended after the sampled ones
(model_runner.py); the values go to `Sequence.prompt_logprobs` in prompt order, once per position even when a
preempted request computes its prompt again, as (token id, logprob, rank, top alternatives). Logprobs are the raw logits'
log-softmax, like the sampler's.
"""
from __future__ import annotations

import torch

from .scheduler import SchedulerOutput
from .sequence import Sequence


def prompt_logprob_rows(sched: SchedulerOutput) -> tuple[list[int], list[tuple[Sequence, int, int]]]:
    """(token rows of the step to take logits at, [(seq, first predicted prompt token, count)]) in row order."""
    rows: list[int] = []
    spans: list[tuple[Sequence, int, int]] = []
    t = sched.num_decodes  # the eager layout: decode rows first, then each chunk's tokens (staging.py)
    for sc in sched.scheduled[sched.num_decodes:]:
        seq, s = sc.seq, sc.start
        end = min(sc.end, seq.num_prompt_tokens - 1)
        if seq.num_prompt_logprobs is not None and s < end:
            rows.extend(range(t, t + end - s))
            spans.append((seq, s + 1, end - s))
        t += sc.num_new_tokens
    return rows, spans


def record_prompt_logprobs(logits: torch.Tensor, spans: list[tuple[Sequence, int, int]]) -> None:
    """`logits`: one row per predicted prompt token, in the order of `spans`."""
    dev = logits.device
    target_ids = [t for seq, first, n in spans for t in seq.token_ids[first:first + n]]
    targets = torch.tensor(target_ids, device=dev)
    lsm = torch.log_softmax(logits.float(), dim=-1)
    chosen_t = lsm.gather(1, targets.view(-1, 1))
    ranks = ((lsm > chosen_t).sum(dim=-1) + 1).tolist()  # 1 = the most likely token (vLLM's rank)
    chosen = chosen_t.view(-1).tolist()
    k = max(seq.num_prompt_logprobs or 0 for seq, _, _ in spans)
    vals, ids = lsm.topk(k, dim=-1) if k else (None, None)
    vals, ids = (vals.tolist(), ids.tolist()) if k else ([], [])
    r = 0
    for seq, first, n in spans:
        kk = seq.num_prompt_logprobs or 0
        for j in range(n):
            if first + j == len(seq.prompt_logprobs) + 1:  # not yet recorded (a recompute skips it)
                alts = list(zip(ids[r + j][:kk], vals[r + j][:kk])) if kk else []
                seq.prompt_logprobs.append((target_ids[r + j], chosen[r + j], ranks[r + j], alts))
        r += n
