"""Tool calls (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`), shared by the gateway and the offline `LLM`.

    request.py  the request's tools and tool choice, validated once into a `ToolRequest` (vLLM's rules)
    plan.py     a ToolRequest + the server's settings -> a `ToolPlan`: the tools the template renders, the
                grammar that enforces "required" / a named function, the parser that reads the output, and
                the finish reason
    parsers/    the registry of output formats (`--tool-call-parser`): model text -> tool calls, whole or as
                a stream of OpenAI deltas; each parser also owns the grammar of its own format

Pure Python: no torch, no llguidance at import time (the gateway imports this package).
"""
from __future__ import annotations

from .parsers import TOOL_PARSERS, ToolParser, get_tool_parser, register_tool_parser
from .plan import ToolPlan, ToolSettings
from .request import FunctionTool, ToolRequest, parse_tool_request

__all__ = ["TOOL_PARSERS", "FunctionTool", "ToolParser", "ToolPlan", "ToolRequest", "ToolSettings",
           "get_tool_parser", "parse_tool_request", "register_tool_parser"]
