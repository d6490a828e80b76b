"""IncrementalDetokenizer: token ids -> text, a few tokens at a time, with stop strings.

Used by both the offline `LLM` and streaming servers, one instance per request:

    det = IncrementalDetokenizer(tokenizer, sampling)
    for out in engine outputs of this request:
        delta = det.add_tokens(out.new_token_ids)     # text that is safe to show now
        if det.stopped:                               # a stop string was found
            engine.abort_request(rid, "stop"); break  # the caller ends the sequence
    delta += det.finish()                             # whatever was held back
    det.text                                          # the whole output text (cut at the stop string)

Decoding uses a sliding window (prefix_offset, read_offset) as vLLM does: the window's text is decoded with
and without the new tokens and the difference is the new text, so multi-byte characters split over tokens
are only emitted once complete ("\\ufffd" at the end means: wait). While stop strings are set, the last
(longest stop - 1) characters are held back, so a stream never shows the start of a stop string that is
then cut.
"""
from __future__ import annotations

from typing import Any

from mmpipe.shared.types import SamplingParams

# Tokens of context kept before the new ones when decoding a window (enough for any merge effects).
_WINDOW = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, sampling: SamplingParams, prompt_token_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.stop_strings: list[str] = [s for s in (sampling.stop or []) if s]
        self.skip_special_tokens = sampling.skip_special_tokens
        self.include_stop = sampling.include_stop_str_in_output
        self.token_ids: list[int] = []
        self.text = ""
        self.stopped = False
        self.stop_reason: str | None = None  # the stop string that matched
        self._emitted = 0  # characters of self.text handed out so far
        # A little prompt context makes the first output tokens decode as they would in the full text.
        ctx = list(prompt_token_ids[-_WINDOW:]) if prompt_token_ids else []
        self._ids = ctx
        self._prefix_offset = 0
        self._read_offset = len(ctx)
        self._hold = max((len(s) for s in self.stop_strings), default=1) - 1 if not self.include_stop else 0

    @property
    def finish_reason(self) -> str | None:
        return "stop" if self.stopped else None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add_tokens(self, token_ids: list[int]) -> str:
        """Feed new token ids; return the text that may be shown now (empty once stopped)."""
        if self.stopped:
            return ""
        for tok in token_ids:
            self.token_ids.append(int(tok))
            self._ids.append(int(tok))
            prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
            full = self._decode(self._ids[self._prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                new = full[len(prefix):]
                self._prefix_offset = max(self._read_offset, len(self._ids) - _WINDOW)
                self._read_offset = len(self._ids)
                before = len(self.text)
                self.text += new
                if self._check_stop(before):
                    break
        return self._take(final=self.stopped)

    def _check_stop(self, before: int) -> bool:
        """Look for a stop string that ends in the new text; cut `text` there. vLLM-compatible: not before
        min_tokens tokens are out."""
        if not self.stop_strings or len(self.token_ids) < self.sampling.min_tokens:
            return False
        best: tuple[int, str] | None = None
        for s in self.stop_strings:
            i = self.text.find(s, max(0, before - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        self.stopped, self.stop_reason = True, s
        return True

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted:end]
        self._emitted = end
        return out

    def finish(self) -> str:
        """The request is over (any reason): return what was held back."""
        return self._take(final=True)
