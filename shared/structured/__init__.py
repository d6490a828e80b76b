"""Structured outputs: the request shape (`params.py`, pure Python), the grammar engine behind it
(`grammar.py`, llguidance: spec -> grammar, validation, compiled-grammar cache) and the engine side
(`masks.py`: one matcher per request, the per-step token bitmask, applying it to the logits).

The spec (a `StructuredOutputsParams`) is plain data: it crosses the gRPC and engine-process wires as data and
is compiled where the tokens are sampled. Must not import torch or llguidance at import time (the gateway
imports this package)."""
from __future__ import annotations

from .params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
