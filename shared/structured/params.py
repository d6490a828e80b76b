"""StructuredOutputsParams: what a request constrains its output to, named as vLLM's
`vllm.sampling_params.StructuredOutputsParams` (json, regex, choice, grammar, json_object).

Pure Python and plain data: it is pickled to the engine process and mapped field by field to the
`StructuredOutputs` proto message; `spec()` is its canonical form and `key()` the hash the engine caches
compiled grammars by.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .limits import SpecLimits

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """Exactly one of: `json` (a JSON schema, as a dict or its JSON text), `regex` (the whole output fullmatches
    it), `choice` (the output is one of these strings), `grammar` (a Lark grammar, llguidance's dialect; GBNF is
    accepted too), `json_object=True` (any JSON object). `source_param`: the request field the spec came from
    when an edge took it from another one (response_format.json_schema.schema, tools[i].function.parameters),
    so that errors name the field the client sent. Sizes are checked here, once (limits.py)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    source_param: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        from mmpipe.shared.errors import InvalidInputError

        if self.json is False:  # the schema `false` (json_object=False, by contrast, means "not given")
            raise InvalidInputError("structured_outputs.json is the schema `false`, which no output satisfies",
                                    param=self.source_param or "structured_outputs.json")
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidInputError("structured_outputs needs exactly one of json, regex, choice, grammar, "
                                    f"json_object; got {given or 'none'}",
                                    param=self.source_param or "structured_outputs")
        where = self.param
        limits = SpecLimits.from_env()
        if isinstance(self.json, str):
            limits.check_size(self.json, where)
            try:
                self.json = json.loads(self.json)
            except RecursionError:  # nested past Python's own limit, so past ours too
                raise limits.too_deep(where) from None
            except ValueError as e:
                raise InvalidInputError(f"{where} is not valid JSON: {e}", param=where) from None
            if self.json is False:
                raise InvalidInputError(f"{where} is the schema `false`, which no output satisfies", param=where)
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise InvalidInputError(f"{where} must be a JSON schema object", param=where)
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidInputError(f"{where} must be a non-empty string", param=where)
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise InvalidInputError(f"{where} must be a non-empty list of non-empty strings", param=where)
            self.choice = list(self.choice)
        if self.json is not None:
            limits.check_schema(self.json, where)  # before json.dumps in spec() can overflow the stack
        limits.check_size(self.spec()[1], where)

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def param(self) -> str:
        """The request field an error about this spec names."""
        return self.source_param or f"structured_outputs.{self.kind}"

    def spec(self) -> tuple[str, str]:
        """(kind, canonical text): the schema as sorted compact JSON, the choices as a JSON list."""
        k = self.kind
        if k == "json":
            return k, json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        if k == "choice":
            return k, json.dumps(self.choice, separators=(",", ":"))
        if k == "json_object":
            return k, ""
        return k, getattr(self, k)

    def key(self) -> str:
        kind, text = self.spec()
        return hashlib.blake2b(f"{kind}\0{text}".encode(), digest_size=16).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _KINDS if getattr(self, k) not in (None, False)}

    @classmethod
    def of(cls, value: "StructuredOutputsParams | dict[str, Any] | None") -> "StructuredOutputsParams | None":
        from mmpipe.shared.errors import InvalidInputError

        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InvalidInputError("structured_outputs must be an object", param="structured_outputs")
        unknown = sorted(set(value) - set(_KINDS) - {"disable_any_whitespace", "disable_additional_properties",
                                                    "whitespace_pattern", "structural_tag"})
        if unknown:
            raise InvalidInputError(f"unknown structured_outputs fields {unknown}", param="structured_outputs")
        for opt in ("whitespace_pattern", "structural_tag", "disable_additional_properties"):
            if value.get(opt):
                from mmpipe.shared.errors import UnsupportedError

                raise UnsupportedError(f"structured_outputs.{opt} is not supported",
                                       param=f"structured_outputs.{opt}")
        return cls(**{k: v for k, v in value.items() if k in _KINDS})
