"""Request-size limits read from the environment: one rule for every `MMPIPE_*` limit that is a positive integer.

Read when a request is checked, not at import, so a bad value is a clear error naming the variable (not a
traceback at start in an unrelated command). Pure Python.
"""
from __future__ import annotations

import os

from mmpipe.shared.errors import InvalidInputError


def positive_int(name: str, default: int) -> int:
    """The variable `name` as an integer >= 1, `default` when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInputError(f"{name}={raw!r} is not an integer", param=name) from None
    if value < 1:
        raise InvalidInputError(f"{name} must be >= 1, got {value}", param=name)
    return value
