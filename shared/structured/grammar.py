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


def checked_grammar(params: StructuredOutputsParams, ll_tokenizer: Any) -> str:
    """The grammar of `params`, validated against an llguidance tokenizer; InvalidInputError naming the field,
    with llguidance's reason (an unimplemented schema keyword, a regex syntax error, ...), if it is refused."""
    import llguidance

    grammar = grammar_of(params)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer)
    if is_error:
        reason = messages[0] if messages else "rejected by the grammar engine"
        raise InvalidInputError(f"invalid or unsupported {params.param}: {reason}", param=params.param)
    return grammar


class GrammarCompiler:
    """Grammars against one tokenizer: validation and a cache of grammar texts (and of refusals) by spec hash.

    `tokenizer` is a Hugging Face fast tokenizer; `vocab_size` the width of the model's logits (>= the
    tokenizer's size; the ids in between, padding, are never allowed). The llguidance tokenizer is built on
    first use (~0.5 s for a 64k vocabulary) so a server that never sees a grammar never pays for it.
    `isolate`: compile new specs in a worker process (sandbox.py), so a spec that crashes or hangs the native
    engine is a 400 and this process lives on: the gateway's setting (it checks every spec before any stage works;
    the engines then compile only specs that passed)."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None, cache_size: int = 1024,
                 isolate: bool = False):
        self.hf_tokenizer = tokenizer
        self.vocab_size = max(int(vocab_size or 0), len(tokenizer))
        self._cache: OrderedDict[str, str | InvalidInputError] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # grammar text -> a matcher that never consumed a token (matcher() hands out copies); fewer than the
        # texts: a pristine matcher holds the grammar's compiled lexer, far more memory than its text
        self._matchers: OrderedDict[str, Any] = OrderedDict()
        self._matcher_cache_size = max(1, min(cache_size, 64))
        self.sandbox = None
        if isolate:
            from .limits import SpecLimits
            from .sandbox import GrammarSandbox

            self.sandbox = GrammarSandbox(tokenizer, self.vocab_size, SpecLimits.from_env().compile_timeout_s)

    @functools.cached_property
    def ll_tokenizer(self) -> Any:
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size)

    def compile(self, params: StructuredOutputsParams) -> str:
        """The validated grammar of `params` (cached by spec hash, refusals too). InvalidInputError naming the
        field, with llguidance's reason (an unimplemented schema keyword, a regex syntax error, ...; isolated:
        also a crash or a timeout of the engine), if it is refused."""
        key = params.key()
        refused_key = f"{params.param}\0{key}"  # a refusal's message names the field it came in
        with self._lock:
            for k in (key, refused_key):
                hit = self._cache.get(k)
                if hit is not None:
                    self._cache.move_to_end(k)
                    break
        if isinstance(hit, InvalidInputError):
            raise InvalidInputError(hit.message, param=params.param)
        if hit is not None:
            return hit
        try:
            if self.sandbox is not None:
                result: str | InvalidInputError = self.sandbox.compile(params)
            else:
                result = checked_grammar(params, self.ll_tokenizer)
        except InvalidInputError as e:
            result = e
        with self._lock:
            self._cache[refused_key if isinstance(result, InvalidInputError) else key] = result
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if isinstance(result, InvalidInputError):
            raise result
        return result

    def matcher(self, params: StructuredOutputsParams) -> Any:
        """A fresh llguidance LLMatcher for one request: a copy of the spec's pristine matcher, built once.

        Building a matcher parses the grammar again (~0.6 ms for a small JSON schema, measured on the CI box);
        `deep_copy` of one that never consumed a token is ~1 us. That was 64 x 0.6 ms at the start of every
        batch of 64 constrained requests (docs/architecture.md, "Structured outputs")."""
        import llguidance

        grammar = self.compile(params)
        with self._lock:
            pristine = self._matchers.get(grammar)
            if pristine is not None:
                self._matchers.move_to_end(grammar)
                return pristine.deep_copy()
        m = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if m.is_error():
            raise InvalidInputError(f"invalid or unsupported {params.param}: {m.get_error()}", param=params.param)
        with self._lock:
            self._matchers[grammar] = m
            while len(self._matchers) > self._matcher_cache_size:
                self._matchers.popitem(last=False)
            return m.deep_copy()
