"""The grammar engine (llguidance): a StructuredOutputsParams -> an llguidance grammar, its validation against a
tokenizer, and the compiled-grammar cache.

Why llguidance (measured in docs/architecture.md, "Structured outputs"): it refuses what it cannot enforce
(`not`, `if`/`then`, `uniqueItems`, `contains`, look-around in a `pattern`, ... are errors naming the keyword,
where xgrammar 0.2 accepts such schemas and silently ignores the keywords), compiles a grammar in ~1 ms, has no
Python dependencies (one abi3 wheel, so any CPython 3.9+ on x86-64 and aarch64) and releases the GIL while it
computes masks for a batch on its own thread pool.

JSON is generated compact (no whitespace between tokens, `,` and `:` separators): free whitespace lets a weak
model spend its whole budget on blanks. Must not import torch (the gateway validates with this module).
"""
from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from typing import Any

from mmpipe.shared.errors import InvalidInputError

from .params import StructuredOutputsParams

_JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_of(params: StructuredOutputsParams) -> str:
    """The llguidance grammar text of a spec (no tokenizer needed). Raises InvalidInputError naming the field
    when the spec cannot be turned into a grammar."""
    import llguidance

    kind = params.kind
    try:
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(params.json), defaults=_JSON_OPTIONS)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(params.regex)
        if kind == "choice":
            alts = " | ".join(json.dumps(c) for c in params.choice or [])
            return llguidance.LLMatcher.grammar_from_lark(f"start: {alts}")
        from llguidance.gbnf_to_lark import any_to_lark

        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(params.grammar or ""))
    except (ValueError, RuntimeError, TypeError) as e:
        raise InvalidInputError(f"invalid {params.param}: {e}", param=params.param) from None


class GrammarCompiler:
    """Grammars against one tokenizer: validation and a cache of grammar texts by spec hash.

    `tokenizer` is a Hugging Face fast tokenizer; `vocab_size` the width of the model's logits (>= the
    tokenizer's size; the ids in between, padding, are never allowed). The llguidance tokenizer is built on
    first use (~0.5 s for a 64k vocabulary) so a server that never sees a grammar never pays for it."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None, cache_size: int = 1024):
        self.hf_tokenizer = tokenizer
        self.vocab_size = max(int(vocab_size or 0), len(tokenizer))
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @functools.cached_property
    def ll_tokenizer(self) -> Any:
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size)

    def compile(self, params: StructuredOutputsParams) -> str:
        """The validated grammar of `params` (cached by spec hash). InvalidInputError naming the field, with
        llguidance's reason (an unimplemented schema keyword, a regex syntax error, ...), if it is refused."""
        key = params.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        import llguidance

        grammar = grammar_of(params)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            reason = messages[0] if messages else "rejected by the grammar engine"
            raise InvalidInputError(f"invalid or unsupported {params.param}: {reason}", param=params.param)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, params: StructuredOutputsParams) -> Any:
        """A fresh llguidance LLMatcher for one request."""
        import llguidance

        m = llguidance.LLMatcher(self.ll_tokenizer, self.compile(params), log_level=0)
        if m.is_error():
            raise InvalidInputError(f"invalid or unsupported {params.param}: {m.get_error()}", param=params.param)
        return m
