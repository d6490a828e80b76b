"""Sampler: turns the last-position logits of a batch into one token per sequence, each with its own settings.

Per row: min_tokens (EOS / stop ids masked until enough tokens are out), bad words, logit bias and the
penalties (logits_processors.py), then greedy (temperature 0) or temperature + min_p + top_k + top_p, drawn
with the row's own torch.Generator when the request has a seed, so a seeded request gives the same tokens
whatever else is in the batch. Logprobs are the log-softmax of the raw logits (before processors, temperature
and filters: vLLM's default `raw_logprobs`) at the chosen token, plus the row's top `logprobs` alternatives.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws from p exactly and needs
one random number per vocabulary entry, generated per row for seeded rows.

Structured outputs: a GrammarMask (shared/structured/masks.py) sets the disallowed tokens of its rows to -inf
before everything else (after the raw logprobs); rows without a grammar are not touched, so they sample as if
alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmpipe.shared.structured.masks import GrammarMask, apply_grammar_mask

from .logits_processors import apply_logits_processors, apply_min_p, needs_processing
from .sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]
    # per row: its top `logprobs` (token id, logprob) alternatives, best first; None when it asked for none
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], mask: GrammarMask | None = None) -> SamplerOutput:
        """logits: (len(seqs), vocab) for the positions that sample; mask: the grammar rows' allowed tokens."""
        n = len(seqs)
        if mask is not None and not any(s.want_logprobs for s in seqs):
            logits = apply_grammar_mask(logits, mask)
            mask = None
        if all(s.sampling.temperature == 0.0 and not s.want_logprobs and not needs_processing(s) and
               not (s.suppress_ids and s.num_output_tokens < s.sampling.min_tokens) for s in seqs):
            # Plain greedy batch: argmax on the model's dtype (exact), no fp32 copy of the logits.
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * n)
        logits = logits.float()
        want_lp = [s.want_logprobs for s in seqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        if mask is not None:
            logits = apply_grammar_mask(logits, mask)

        # min_tokens: hold back EOS and stop ids (masking a copy keeps the raw logits for logprobs).
        masked = False
        for i, s in enumerate(seqs):
            if s.suppress_ids and s.num_output_tokens < s.sampling.min_tokens:
                if not masked:
                    logits = logits.clone()
                    masked = True
                logits[i, s.suppress_ids] = float("-inf")
        if any(needs_processing(s) for s in seqs):
            logits = apply_logits_processors(logits if masked else logits.clone(), seqs)

        greedy = [s.sampling.temperature == 0.0 for s in seqs]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, seqs, greedy)

        token_list = tokens.tolist()
        lps: list[float | None] = [None] * n
        tops: list[list[tuple[int, float]] | None] | None = None
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, tokens.view(-1, 1)).view(-1).tolist()
            lps = [c if w else None for c, w in zip(chosen, want_lp)]
            k = max(s.num_top_logprobs for s in seqs)
            if k:  # one top-k for the batch at its largest k, cut per row
                vals, ids = raw_logprobs.topk(min(k, raw_logprobs.shape[1]), dim=-1)
                vals, ids = vals.tolist(), ids.tolist()
                tops = [list(zip(ids[i][:s.num_top_logprobs], vals[i][:s.num_top_logprobs]))
                        if s.num_top_logprobs else None for i, s in enumerate(seqs)]
        return SamplerOutput(token_list, lps, tops)

    @staticmethod
    def _sample(logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        n, vocab = logits.shape
        dev = logits.device
        temps = torch.tensor([1.0 if g else s.sampling.temperature for s, g in zip(seqs, greedy)],
                             device=dev, dtype=torch.float32)
        scaled = logits / temps.unsqueeze(1)
        min_p = [0.0 if g else s.sampling.min_p for s, g in zip(seqs, greedy)]
        if any(min_p):
            scaled = apply_min_p(scaled, min_p)

        top_k = [s.sampling.top_k if 0 < s.sampling.top_k < vocab else vocab for s in seqs]
        top_p = [s.sampling.top_p for s in seqs]
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            scaled = _apply_top_k_top_p(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)

        # Exponential race; seeded rows draw their noise from their own generator, the rest share one draw.
        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            if len(unseeded) == n:
                noise.exponential_()
            else:
                idx = torch.tensor(unseeded, device=dev)
                noise[idx] = torch.empty(len(unseeded), vocab, device=dev).exponential_()
        for i, s in enumerate(seqs):
            if s.generator is not None:
                noise[i].exponential_(generator=s.generator)
        sampled = (probs / noise).argmax(dim=-1)
        if any(greedy):
            g = torch.tensor(greedy, device=dev)
            sampled = torch.where(g, logits.argmax(dim=-1), sampled)
        return sampled


def _apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask everything outside each row's top-k and top-p nucleus with -inf (row-wise, batch-independent)."""
    dev = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=dev).unsqueeze(0)
    k = torch.tensor(top_k, device=dev).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    p = torch.tensor(top_p, device=dev, dtype=torch.float32).unsqueeze(1)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill((mass_before >= p) & (ranks > 0), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
