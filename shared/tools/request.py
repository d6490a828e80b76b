"""The tools of one chat request, validated once: `parse_tool_request(tools, tool_choice, parallel_tool_calls)`.

Rules as vLLM's (`ChatCompletionRequest.check_tool_usage`) and OpenAI's: tools are `{"type": "function",
"function": {"name", "description", "parameters", "strict"}}`; a function name is 1-64 of `[a-zA-Z0-9_-]`
and unique; `parameters` is a JSON schema object (omitted: no arguments). `tool_choice` is "none", "auto",
"required" or `{"type": "function", "function": {"name": ...}}` naming one of the tools; it defaults to "auto"
when tools are given and to "none" when not; "required" with an empty tool list means "none". Anything else is
an InvalidInputError naming the field (`tools[1].function.name`, `tool_choice.function.name`, ...).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mmpipe.shared.errors import InvalidInputError

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
CHOICES = ("none", "auto", "required")
_NAMED_USAGE = 'use {"type": "function", "function": {"name": "my_function"}}'


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str | None
    parameters: dict[str, Any]  # a JSON schema of the arguments object ({"type": "object"} when omitted)
    strict: bool | None = None

    def to_template(self) -> dict[str, Any]:
        """The tool as chat templates take it (transformers' `apply_chat_template(tools=...)`, OpenAI's shape)."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolRequest:
    """`choice` is "none" | "auto" | "required" | "function" (then `function` names it); `choice_given`: the
    client set tool_choice itself (errors then name that field rather than `tools`)."""

    tools: tuple[FunctionTool, ...]
    choice: str
    function: str | None = None
    parallel: bool = True
    choice_given: bool = False

    @property
    def forced(self) -> bool:
        """The output must be a tool call ("required" or a named function): enforced by a grammar."""
        return self.choice in ("required", "function")

    @property
    def callable(self) -> tuple[FunctionTool, ...]:
        """The tools the model may call: all of them, or only the named one."""
        return tuple(t for t in self.tools if self.function is None or t.name == self.function)

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [t.to_template() for t in self.tools] or None


def _function_tool(tool: Any, i: int) -> FunctionTool:
    at = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise InvalidInputError(f"{at} must be an object", param=at)
    if tool.get("type", "function") != "function":
        raise InvalidInputError(f"{at}.type must be 'function', got {tool.get('type')!r}", param=f"{at}.type")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise InvalidInputError(f"{at}.function must be an object with a name", param=f"{at}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInputError(f"{at}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                                param=f"{at}.function.name")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise InvalidInputError(f"{at}.function.description must be a string", param=f"{at}.function.description")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise InvalidInputError(f"{at}.function.parameters must be a JSON schema object",
                                param=f"{at}.function.parameters")
    kind = params.get("type", "object")
    if kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise InvalidInputError(f"{at}.function.parameters must describe an object (type 'object'), got type "
                                f"{kind!r}", param=f"{at}.function.parameters.type")
    if not isinstance(params.get("properties", {}), dict):
        raise InvalidInputError(f"{at}.function.parameters.properties must be an object",
                                param=f"{at}.function.parameters.properties")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidInputError(f"{at}.function.strict must be a boolean", param=f"{at}.function.strict")
    return FunctionTool(name=name, description=desc, parameters=params, strict=strict)


def _named(choice: dict[str, Any], names: set[str]) -> str:
    if choice.get("type", "function") != "function":
        raise InvalidInputError(f"tool_choice.type must be 'function'; {_NAMED_USAGE}", param="tool_choice.type")
    fn = choice.get("function")
    if not isinstance(fn, dict):
        raise InvalidInputError(f"tool_choice.function must be an object; {_NAMED_USAGE}",
                                param="tool_choice.function")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"tool_choice.function.name must be a non-empty string; {_NAMED_USAGE}",
                                param="tool_choice.function.name")
    if name not in names:
        raise InvalidInputError(f"tool_choice names the function {name!r}, which is not among the request's "
                                f"tools {sorted(names)}", param="tool_choice.function.name")
    return name


def parse_tool_request(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None) -> ToolRequest | None:
    """The validated tools of a request, or None when it has none and no tool_choice (plain chat)."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise InvalidInputError("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    parallel = parallel_tool_calls is not False
    if tools is None and tool_choice in (None, "none"):
        return None
    if tools is None:
        raise InvalidInputError("tool_choice needs tools: give the functions under `tools`", param="tool_choice")
    if not isinstance(tools, list):
        raise InvalidInputError("tools must be a list of {'type': 'function', 'function': {...}}", param="tools")
    parsed = tuple(_function_tool(t, i) for i, t in enumerate(tools))
    seen: set[str] = set()
    for i, t in enumerate(parsed):
        if t.name in seen:
            raise InvalidInputError(f"tools[{i}].function.name {t.name!r} is given twice",
                                    param=f"tools[{i}].function.name")
        seen.add(t.name)
    given = tool_choice is not None
    if tool_choice is None:
        tool_choice = "auto" if parsed else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise InvalidInputError(f"tool_choice must be one of {', '.join(CHOICES)} or a named function "
                                    f"({_NAMED_USAGE}), got {tool_choice!r}", param="tool_choice")
        if tool_choice == "required" and not parsed:
            tool_choice = "none"  # vLLM: nothing to require
        return ToolRequest(parsed, tool_choice, None, parallel, given)
    if isinstance(tool_choice, dict):
        return ToolRequest(parsed, "function", _named(tool_choice, seen), parallel, given)
    raise InvalidInputError(f"tool_choice must be a string or an object; {_NAMED_USAGE}", param="tool_choice")
