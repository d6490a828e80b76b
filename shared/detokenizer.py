"""Incremental detokenization with stop strings, for the offline loop and for streaming servers.

Decoding token by token is wrong for byte-level BPE (a character can span tokens), and decoding the whole
sequence every step is quadratic; this keeps a prefix offset and only re-decodes a short tail. Stop strings
are searched in the newly produced text plus enough of the old text to catch a stop string that straddles
two steps. Text that could still turn out to be the start of a stop string is held back from streaming.
"""
from __future__ import annotations

from typing import Any

from mmpipe.shared.types import SamplingParams


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, sampling: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special = sampling.skip_special_tokens
        self.stops: list[str] = list(sampling.stop or [])
        self.include_stop = sampling.include_stop_str_in_output
        self.token_ids: list[int] = []
        self._text = ""  # all text decoded so far (before stop truncation)
        self._prefix_offset = 0  # tokens before this are decoded into _text for good
        self._read_offset = 0
        self.stopped = False
        self.stop_token_count: int | None = None  # tokens kept when a stop string ended the sequence
        self._final_text: str | None = None
        self._streamed = 0  # characters handed out by `take_new_text`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add_tokens(self, new_ids: list[int]) -> bool:
        """Feed new tokens; returns True once a stop string has ended the sequence."""
        for tid in new_ids:
            if self.stopped:
                break
            self.token_ids.append(tid)
            prefix = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
            full = self._decode(self.token_ids[self._prefix_offset:])
            if full.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
                continue
            new = full[len(prefix):]
            old_len = len(self._text)
            self._text += new
            self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
            if self.stops and new:
                self._check_stop(old_len)
        return self.stopped

    def _check_stop(self, old_len: int) -> None:
        longest = max(len(s) for s in self.stops)
        start = max(0, old_len - longest + 1)
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = self._text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self._final_text = self._text[: i + len(s)] if self.include_stop else self._text[:i]
            self.stopped = True
            self.stop_token_count = len(self.token_ids)

    @property
    def output_text(self) -> str:
        return self._final_text if self._final_text is not None else self._text

    def take_new_text(self, finished: bool = False) -> str:
        """Text not yet handed out, holding back a tail that may be the start of a stop string."""
        text = self.output_text
        end = len(text)
        if not finished and not self.stopped and self.stops:
            hold = max(len(s) for s in self.stops) - 1
            end = max(self._streamed, end - hold)
        chunk = text[self._streamed:end]
        self._streamed = end
        return chunk
