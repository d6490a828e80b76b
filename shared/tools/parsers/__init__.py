"""The registry of tool-call output formats, by vLLM's `--tool-call-parser` names.

A new format is one module here with a `ToolParser` subclass decorated `@register_tool_parser("name")` and an
import below; the gateway's flag, `mmpipe serve` and the offline API pick it up by name.
"""
from __future__ import annotations

from mmpipe.shared.errors import InvalidInputError

from .base import DeltaToolCall, ExtractedToolCalls, StreamDelta, ToolCall, ToolCallStream, ToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {}
# The format "required" and a named function are generated in when the server names no parser.
DEFAULT_TOOL_PARSER = "hermes"


def register_tool_parser(name: str):
    def deco(cls: type[ToolParser]) -> type[ToolParser]:
        cls.name = name
        TOOL_PARSERS[name] = cls
        return cls

    return deco


def get_tool_parser(name: str | None) -> type[ToolParser]:
    name = name or DEFAULT_TOOL_PARSER
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise InvalidInputError(f"unknown tool call parser {name!r}; choose one of {', '.join(sorted(TOOL_PARSERS))}",
                                param="--tool-call-parser") from None


from . import hermes  # noqa: E402,F401  (registers "hermes")

__all__ = ["DEFAULT_TOOL_PARSER", "TOOL_PARSERS", "DeltaToolCall", "ExtractedToolCalls", "StreamDelta", "ToolCall",
           "ToolCallStream", "ToolParser", "get_tool_parser", "register_tool_parser"]
