"""Per-request `mm_processor_kwargs`: which keys a request may set, in what range, under which server ceiling.

vLLM's `mm_processor_kwargs` are flat keywords the HF processor routes to its sub-processors. The server's
(`--mm-processor-kwargs`, `LLM(mm_processor_kwargs=...)`) are the defaults; a request's own overlay them, key by
key, after `resolve_mm_kwargs` checked each against its family's allow-list (`KwargRule`s declared by the adapter,
`ModelAdapter.request_mm_kwargs`): an unknown key, a value of the wrong type or out of range, or one above the
server's ceiling for that key (a request may not raise `max_pixels` above the server's) is an InvalidInputError
naming `mm_processor_kwargs.<key>`. The result, the effective kwargs, is what the processor is called with and
what the cache keyspace digests, so one image at two sizes never shares an entry.

Owns: the check of a request's kwargs against rules and ceilings. Must not: know the families (the adapters
declare their rules and ceilings), call a processor, or import torch.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mmpipe.shared.errors import InvalidInputError

PARAM = "mm_processor_kwargs"


@dataclass(frozen=True)
class KwargRule:
    """One key a request may set. `kind`: "int" or "float"; `minimum`: inclusive lower bound; `capped`: the value
    may not exceed the server's (its flag, else the processor's configured value: `ModelAdapter.mm_kwargs_ceilings`);
    `excludes`: keys it may not be combined with (transformers refuses fps with num_frames)."""

    kind: str
    minimum: float
    capped: bool = False
    excludes: tuple[str, ...] = ()
    doc: str = ""


def parse_kwargs_json(value: str | Mapping[str, Any] | None, param: str) -> dict[str, Any]:
    """A kwargs object from the wire (JSON text; empty = none) or from Python; anything but an object is refused."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidInputError(f"{param} is not valid JSON", param=param) from None
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"{param} must be an object, got {type(value).__name__}", param=param)
    return dict(value)


def _number(key: str, rule: KwargRule, v: Any) -> int | float:
    param = f"{PARAM}.{key}"
    if rule.kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidInputError(f"{param} must be an integer, got {v!r}", param=param)
    elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidInputError(f"{param} must be a finite number, got {v!r}", param=param)
    if v < rule.minimum:
        raise InvalidInputError(f"{param} must be at least {rule.minimum:g}, got {v!r}", param=param)
    return v


def resolve_mm_kwargs(family: str, rules: Mapping[str, KwargRule], ceilings: Mapping[str, float],
                      server: Mapping[str, Any], request: Mapping[str, Any] | None) -> dict[str, Any]:
    """The effective kwargs: `server` overlaid with `request`, every request key checked against `rules`."""
    request = parse_kwargs_json(request, PARAM)
    if not request:
        return dict(server)
    unknown = sorted(set(request) - set(rules))
    if unknown:
        allowed = f"it may set {', '.join(sorted(rules))}" if rules else "it takes none per request"
        raise InvalidInputError(f"{PARAM} key {unknown[0]!r} is not accepted for {family} models ({allowed}; "
                                f"server-wide settings go in --mm-processor-kwargs)", param=f"{PARAM}.{unknown[0]}")
    for key, v in request.items():
        rule = rules[key]
        _number(key, rule, v)
        cap = ceilings.get(key)
        if rule.capped and cap is not None and v > cap:
            raise InvalidInputError(f"{PARAM}.{key}={v!r} is above this server's {key} ({cap:g}); a request may "
                                    f"lower it, not raise it", param=f"{PARAM}.{key}")
        for other in rule.excludes:
            if other in request:
                raise InvalidInputError(f"{PARAM}: give {key} or {other}, not both", param=f"{PARAM}.{key}")
    return {**server, **request}
