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
COMPILE_TIMEOUT_ENV = "MMPIPE_STRUCTURED_OUTPUTS_COMPILE_TIMEOUT_S"

# llguidance reads a schema's numeric bounds as doubles, then an integer range's as i64: past 2**53 a bound is no
# longer exact, and an integer range whose bounds both land on i64's minimum (e.g. minimum = maximum = -2**63, or
# -1e300) segfaulted its compile (llguidance 1.9.1, found by the fuzz run of 2026-12-02). So bounds stay within
# the range every JSON implementation holds exactly (RFC 8259, section 6).
MAX_BOUND = 2 ** 53
_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


@dataclass(frozen=True)
class SpecLimits:
    """max_bytes: UTF-8 size of the spec's canonical text (compact JSON schema, regex, grammar, choices);
    max_depth: nesting of objects and arrays in a JSON schema; compile_timeout_s: wall-clock seconds the
    grammar engine may take to compile (or refuse) one spec where it runs isolated (sandbox.py)."""

    max_bytes: int = 32768
    max_depth: int = 64
    compile_timeout_s: float = 10.0

    @classmethod
    def from_env(cls) -> "SpecLimits":
        return cls(max_bytes=positive_int(MAX_BYTES_ENV, cls.max_bytes),
                   max_depth=positive_int(MAX_DEPTH_ENV, cls.max_depth),
                   compile_timeout_s=float(positive_int(COMPILE_TIMEOUT_ENV, int(cls.compile_timeout_s))))

    def check_schema(self, schema: Any, param: str) -> None:
        """Refuse a schema nested deeper than max_depth, or with a numeric bound past +-MAX_BOUND (one iterative
        walk: a deep schema cannot overflow the stack)."""
        stack = [(schema, 1)]
        while stack:
            value, depth = stack.pop()
            if isinstance(value, dict):
                kids = value.values()
                for key in _BOUND_KEYS:
                    _check_bound(value.get(key), key, param)
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


def _check_bound(bound: Any, key: str, param: str) -> None:
    if isinstance(bound, (int, float)) and not isinstance(bound, bool) and not -MAX_BOUND <= bound <= MAX_BOUND:
        raise LimitExceededError(f"{param}: `{key}` is {bound:g}; numeric bounds must lie within +-2**53 "
                                 f"({MAX_BOUND}), the range JSON numbers hold exactly", param=param)
