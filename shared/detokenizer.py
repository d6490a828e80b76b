"""Incremental detokenization with stop strings: one implementation for the offline loop and the generator
service (which streams the text; the gateway only forwards it).

Decoding token by token is wrong for byte-level BPE (a character can span tokens) and decoding the whole
sequence every step is quadratic. With a fast tokenizer (a `tokenizers.Tokenizer` behind it, every HF "fast"
tokenizer) the Rust incremental decoder `tokenizers.decoders.DecodeStream` does this in one call per token: it
keeps prefix/read offsets, decodes a short window and returns nothing while the tail is an incomplete UTF-8
character, with the same decoder pipeline and special-token skipping as `tokenizer.decode(...,
clean_up_tokenization_spaces=False)`. Other tokenizers take the same algorithm in Python (a window of a few
tokens of context, decoded through `tokenizer.decode`).

Stop strings are searched in the new text plus enough of the old to catch one that straddles two steps, only
once `min_tokens` are out (as vLLM does). Text that could still turn out to be the start of a stop string is
held back from streaming, so a stream never shows half a stop string.
"""
from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from mmpipe.shared.types import SamplingParams

# Tokens of context kept before the new ones when decoding a window (enough for any merge effects).
_WINDOW = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, sampling: SamplingParams, prompt_token_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.min_tokens = sampling.min_tokens
        self.stops: list[str] = [s for s in (sampling.stop or []) if s]
        self.skip_special = sampling.skip_special_tokens
        self.include_stop = sampling.include_stop_str_in_output
        self.token_ids: list[int] = []  # output tokens accepted (none after the one completing a stop string)
        self.output_text = ""
        self.stopped = False
        self.stop_reason: str | None = None  # the stop string that matched
        self._streamed = 0  # characters handed out by take_new_text
        # A little prompt context makes the first output tokens decode as they would in the full text.
        context = list(prompt_token_ids[-_WINDOW:]) if prompt_token_ids else []
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend: Tokenizer | None = backend if isinstance(backend, Tokenizer) else None
        if self._backend is not None:
            self._stream = DecodeStream(context or None, skip_special_tokens=self.skip_special)
        else:
            self._ids = context
            self._prefix_offset = 0
            self._read_offset = len(self._ids)
        self._hold = max((len(s) for s in self.stops), default=1) - 1 if not self.include_stop else 0

    @property
    def stop_token_count(self) -> int | None:
        """How many output tokens belong to the output when a stop string ended it (else None)."""
        return len(self.token_ids) if self.stopped else None

    def add_tokens(self, new_ids: list[int]) -> bool:
        """Feed new tokens; returns True once a stop string has ended the sequence."""
        for tid in new_ids:
            if self.stopped:
                break
            tid = int(tid)
            self.token_ids.append(tid)
            text = self._stream.step(self._backend, tid) if self._backend is not None else self._window_step(tid)
            if text:
                before = len(self.output_text)
                self.output_text += text
                self._check_stop(before)
        return self.stopped

    def _window_step(self, tid: int) -> str | None:
        """The Python fallback of DecodeStream.step for tokenizers without a Rust backend."""
        self._ids.append(tid)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # nothing printable yet, or an incomplete UTF-8 character: wait for the next token
        self._prefix_offset = max(self._read_offset, len(self._ids) - _WINDOW)
        self._read_offset = len(self._ids)
        return full[len(prefix):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special, clean_up_tokenization_spaces=False)

    def _check_stop(self, before: int) -> None:
        if not self.stops or len(self.token_ids) < self.min_tokens:
            return
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = self.output_text.find(s, max(0, before - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.output_text = self.output_text[: i + len(s)] if self.include_stop else self.output_text[:i]
            self.stopped, self.stop_reason = True, s

    def take_new_text(self, finished: bool = False) -> str:
        """Text not yet handed out, holding back a tail that may be the start of a stop string."""
        final = finished or self.stopped
        end = len(self.output_text) if final else max(self._streamed, len(self.output_text) - self._hold)
        chunk = self.output_text[self._streamed:end]
        self._streamed = end
        return chunk
