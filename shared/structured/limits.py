"""How large a structured-output spec may be, checked when the spec is made (`StructuredOutputsParams`), before
anything serialises, hashes or compiles it: every edge (HTTP, the public gRPC API, the offline `LLM`, the
generator's proto decode) refuses the same specs with the same 400 naming the field and the limit.

Why limits of our own, beside llguidance's (lexer fuel, grammar size, Earley items per step, which bound the
regex and mask work): building the grammar is not bounded by them. Measured on the 2-core CI machines with a tiny
tokenizer: one object of 10,000 optional properties (290 KB of schema) took 3.4 s to validate and 10-50 s to turn
into a matcher, which the generator does on its engine loop (every request in the batch waits); 3,000 (86 KB)
took about 1 s. A schema nested about 500 levels deep overflows Python's recursion in `json.dumps` (a 500, not a
400). At the defaults below the costliest spec (1,288 optional properties in 32 KB) compiles, matcher included,
in 0.7 s.

Must not import llguidance or torch (the gateway's request models import this).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmpipe.shared.env_limits import positive_int
from mmpipe.shared.errors import LimitExceededError

MAX_BYTES_ENV = "MMPIPE_STRUCTURED_OUTPUTS_MAX_BYTES"
MAX_DEPTH_ENV = "MMPIPE_STRUCTURED_OUTPUTS_MAX_DEPTH"


@dataclass(frozen=True)
class SpecLimits:
    """max_bytes: UTF-8 size of the spec's canonical text (compact JSON schema, regex, grammar, choices);
    max_depth: nesting of objects and arrays in a JSON schema."""

    max_bytes: int = 32768
    max_depth: int = 64

    @classmethod
    def from_env(cls) -> "SpecLimits":
        return cls(max_bytes=positive_int(MAX_BYTES_ENV, cls.max_bytes),
                   max_depth=positive_int(MAX_DEPTH_ENV, cls.max_depth))

    def check_depth(self, schema: Any, param: str) -> None:
        """Refuse a schema nested deeper than max_depth (iteratively: a deep schema cannot overflow the stack)."""
        stack = [(schema, 1)]
        while stack:
            value, depth = stack.pop()
            if isinstance(value, dict):
                kids = value.values()
            elif isinstance(value, (list, tuple)):
                kids = value
            else:
                continue
            if depth > self.max_depth:
                raise self.too_deep(param)
            stack.extend((k, depth + 1) for k in kids)

    def too_deep(self, param: str) -> LimitExceededError:
        return LimitExceededError(f"{param} is nested more than {self.max_depth} levels deep (objects and arrays; "
                                  f"{MAX_DEPTH_ENV})", param=param)

    def check_size(self, text: str, param: str) -> None:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_bytes:
            raise LimitExceededError(f"{param} is {size} bytes; structured outputs take at most {self.max_bytes} "
                                     f"({MAX_BYTES_ENV})", param=param)

