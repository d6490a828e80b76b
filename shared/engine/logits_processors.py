"""Per-request logits processors of the sampler, applied to a whole batch at once with vLLM's semantics.

Order (vLLM v1's sampler): bad words, logit bias, then the penalties — repetition (over prompt + output
tokens: a seen token's logit is divided by the penalty when positive, multiplied when negative, as
transformers' RepetitionPenaltyLogitsProcessor), frequency (minus penalty x count in the output) and presence
(minus penalty if in the output), OpenAI's definitions. min_p (keep tokens with p >= min_p x max p, after
temperature; transformers' MinPLogitsWarper) is applied by the sampler next to top-k / top-p.

Only the rows that set an option are touched, and each in one batched op (one scatter of the token counts of
all penalised rows, one index_put for all biases and banned words): rows without options sample exactly as if
alone. Must not know about grammars or the scheduler.
"""
from __future__ import annotations

import torch

from .sequence import Sequence


def needs_processing(seq: Sequence) -> bool:
    """True when a row's logits change before temperature (bias, bad words, penalties)."""
    return seq.has_penalties or seq.logit_bias_ids is not None or bool(seq.bad_words_token_ids)


def apply_logits_processors(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """`logits`: (len(seqs), vocab) fp32, modified in place and returned."""
    _apply_bad_words(logits, seqs)
    _apply_logit_bias(logits, seqs)
    _apply_penalties(logits, seqs)
    return logits


def _apply_bad_words(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """vLLM's rule: a word's last token is banned when the output ends with the word's other tokens."""
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(seqs):
        if not s.bad_words_token_ids:
            continue
        out = s.output_token_ids
        for word in s.bad_words_token_ids:
            k = len(word) - 1
            if k > len(out):
                continue
            if k == 0 or out[-k:] == word[:k]:
                rows.append(i)
                cols.append(word[-1])
    if rows:
        dev = logits.device
        logits[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = float("-inf")


def _apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i, s in enumerate(seqs):
        if s.logit_bias_ids is not None:
            rows.extend([i] * len(s.logit_bias_ids))
            cols.extend(s.logit_bias_ids)
            vals.extend(s.logit_bias_values)
    if rows:
        dev = logits.device
        logits.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                          torch.tensor(vals, device=dev, dtype=logits.dtype), accumulate=True)


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    idx = [i for i, s in enumerate(seqs) if s.has_penalties]
    if not idx:
        return
    dev, vocab = logits.device, logits.shape[1]
    sub = [seqs[i] for i in idx]
    out_counts = _bin_counts([s.output_token_ids for s in sub], vocab, dev)
    out_mask = out_counts > 0
    rows = torch.tensor(idx, device=dev)
    part = logits[rows]
    rep = torch.tensor([s.sampling.repetition_penalty for s in sub], device=dev, dtype=logits.dtype)
    if bool((rep != 1.0).any()):
        seen = out_mask | (_bin_counts([s.token_ids[:s.num_prompt_tokens] for s in sub], vocab, dev) > 0)
        pen = torch.where(seen, rep.unsqueeze(1), torch.ones((), device=dev, dtype=logits.dtype))
        part = torch.where(part > 0, part / pen, part * pen)
    freq = torch.tensor([s.sampling.frequency_penalty for s in sub], device=dev, dtype=logits.dtype)
    pres = torch.tensor([s.sampling.presence_penalty for s in sub], device=dev, dtype=logits.dtype)
    part = part - freq.unsqueeze(1) * out_counts - pres.unsqueeze(1) * out_mask
    logits[rows] = part


def _bin_counts(token_lists: list[list[int]], vocab: int, dev: torch.device) -> torch.Tensor:
    """(len(token_lists), vocab) counts of each token id, from one padded scatter (the pad id is `vocab`)."""
    width = max((len(t) for t in token_lists), default=0)
    padded = torch.full((len(token_lists), max(width, 1)), vocab, dtype=torch.long)
    for r, toks in enumerate(token_lists):
        if toks:
            padded[r, :len(toks)] = torch.as_tensor(toks, dtype=torch.long)
    padded = padded.to(dev, non_blocking=True)
    counts = torch.zeros(len(token_lists), vocab + 1, device=dev, dtype=torch.float32)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab]


def apply_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Mask tokens whose probability is below min_p x the row's top probability (rows with 0 untouched)."""
    mp = torch.tensor(min_p, device=logits.device, dtype=torch.float32).unsqueeze(1)
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < mp * probs.amax(dim=-1, keepdim=True), float("-inf"))
