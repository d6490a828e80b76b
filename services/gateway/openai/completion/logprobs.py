"""OpenAI's legacy completion `logprobs` (tokens, token_logprobs, top_logprobs, text_offset): the one writer of
them, for a whole answer and for each stream chunk, so that a stream's chunks, concatenated, are the whole answer.

With `echo` the prompt's tokens come first, as vLLM writes them: the first prompt token has no logprob and no
alternatives (nothing comes before it), every later one its prompt logprob and top alternatives; a stream sends
them with the first chunk of each choice. A token's text is its own decode, and `text_offset` counts those texts
on from the start of the choice, over prompt and completion; a `LogprobsWriter` carries that count from one
chunk to the next (vLLM's stream counts the delta texts instead, which is not what its whole answer says).

This module knows the tokenizer and the wire model; it does not know HTTP, streams or the request.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .protocol import CompletionLogprobs

# One token as the logprobs show it: its id, its logprob (None: the first prompt token) and its top
# (token id, logprob) alternatives (None: none asked for, or the first prompt token).
Entry = tuple[int, float | None, Sequence[tuple[int, float]] | None]


def prompt_entries(ids: Sequence[int], prompt_logprobs: Sequence[Any] | None) -> list[Entry]:
    """The prompt's tokens with their prompt logprobs (per token None, the first, or (id, logprob, rank,
    alternatives), as GenerationStream keeps them); without any (a one-token prompt) every entry is null."""
    entries = prompt_logprobs or [None] * len(ids)
    return [(t, None, None) if e is None else (t, e[1], e[3]) for t, e in zip(ids, entries, strict=True)]


def output_entries(ids: Sequence[int], lps: Sequence[float] | None,
                   tops: Sequence[Sequence[tuple[int, float]]] | None) -> list[Entry]:
    """Generated tokens with their logprobs and (when asked for) their alternatives."""
    return [(t, lp, tops[i] if tops else None) for i, (t, lp) in enumerate(zip(ids, lps or []))]


def choice_entries(ids: Sequence[int], lps: Sequence[float] | None,
                   tops: Sequence[Sequence[tuple[int, float]]] | None,
                   prompt: tuple[Sequence[int], Sequence[Any] | None] | None = None) -> list[Entry]:
    """The entries of a choice or of one chunk of it: with `prompt` (echo: the prompt's ids and prompt logprobs)
    the prompt's tokens first, then the generated ones."""
    out = prompt_entries(*prompt) if prompt is not None else []
    out += output_entries(ids, lps, tops)
    return out


class LogprobsWriter:
    """The logprobs of one choice, piece by piece: each `write` continues the text offsets of the one before.
    `with_tops`: the request asked for alternatives (logprobs > 0), so `top_logprobs` is a list (else None)."""

    __slots__ = ("_decode", "with_tops", "offset")

    def __init__(self, tokenizer: Any, with_tops: bool):
        self._decode = tokenizer.decode
        self.with_tops = with_tops
        self.offset = 0

    def write(self, entries: Sequence[Entry]) -> CompletionLogprobs:
        out = CompletionLogprobs(top_logprobs=[] if self.with_tops else None)
        for t, lp, alts in entries:
            s = self._decode([t])
            out.tokens.append(s)
            out.token_logprobs.append(lp)
            out.text_offset.append(self.offset)
            if out.top_logprobs is not None:
                # alternatives keyed by their text, as vLLM's (two ids of one text keep the first one's)
                out.top_logprobs.append(None if alts is None else {self._decode([a]): v for a, v in alts})
            self.offset += len(s)
        return out


def chunk_json(lp: CompletionLogprobs, finite: Callable[[float], float | None]) -> dict[str, Any]:
    """A piece as a stream chunk's JSON, in the field order of CompletionLogprobs (exclude_none); `finite` maps a
    float that JSON cannot hold to null as pydantic does (http/sse.finite); an empty top_logprobs is left out."""
    out: dict[str, Any] = {"tokens": lp.tokens,
                           "token_logprobs": [None if x is None else finite(x) for x in lp.token_logprobs]}
    if lp.top_logprobs:
        out["top_logprobs"] = [None if d is None else {k: finite(v) for k, v in d.items()} for d in lp.top_logprobs]
    out["text_offset"] = lp.text_offset
    return out
