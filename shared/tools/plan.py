"""A request's tools under the server's settings -> what each step of serving does with them (`ToolPlan`).

    template   the tools go to the chat template (`apply_chat_template(tools=...)`), whatever the choice
    sampling   "required" / a named function: the parser's grammar of calls to those functions becomes the
               request's structured output (each function's parameters schema is compiled first, so a schema
               the grammar engine refuses is a 400 naming `tools[i].function.parameters`)
    output     "auto" (with --enable-auto-tool-choice) and forced choices: the parser turns the answer into
               `message.tool_calls`; "none": the answer is content, unparsed
    finish     "tool_calls" when "auto" produced calls, or "required" finished its grammar; a named function
               keeps "stop" (OpenAI's and vLLM's behaviour)

"auto" on a server without --enable-auto-tool-choice is a 400, as in vLLM; the offline API renders the tools
and leaves the answer unparsed (as vLLM's `LLM.chat(tools=...)` does).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.structured.params import StructuredOutputsParams

from .parsers import ToolParser, get_tool_parser
from .request import ToolRequest


@dataclass(frozen=True)
class ToolSettings:
    """The server's flags: vLLM's --enable-auto-tool-choice and --tool-call-parser."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise InvalidInputError("--enable-auto-tool-choice needs --tool-call-parser (e.g. hermes)",
                                    param="--tool-call-parser")
        if self.tool_call_parser:
            get_tool_parser(self.tool_call_parser)


@dataclass(frozen=True)
class ToolPlan:
    request: ToolRequest
    parser: type[ToolParser] | None  # None: the answer is not parsed

    @classmethod
    def make(cls, request: ToolRequest | None, settings: ToolSettings, *, offline: bool = False) -> "ToolPlan | None":
        if request is None:
            return None
        auto = request.choice == "auto"
        if auto and not settings.enable_auto_tool_choice and not offline:
            raise InvalidInputError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                    'to be set on the server (send tool_choice "none", "required" or a named '
                                    'function instead)', param="tool_choice" if request.choice_given else "tools")
        parses = request.forced or (auto and settings.enable_auto_tool_choice)
        return cls(request, get_tool_parser(settings.tool_call_parser) if parses else None)

    def template_tools(self) -> list[dict[str, Any]] | None:
        return self.request.template_tools()

    def sampling(self, sampling: Any, compiler: Any | None = None) -> Any:
        """`sampling` with the grammar of a forced choice (unchanged otherwise). `compiler` (a GrammarCompiler)
        checks each function's schema first, so a refusal names the tool."""
        req = self.request
        if not req.forced or self.parser is None:
            return sampling
        if sampling.structured_outputs is not None:
            raise InvalidInputError(f"tool_choice {req.function or req.choice!r} is enforced with a grammar and "
                                    "cannot be combined with response_format or structured_outputs",
                                    param="tool_choice")
        if compiler is not None:
            for i, t in enumerate(req.tools):
                if req.function is None or t.name == req.function:
                    # errors name the tool
                    compiler.compile(StructuredOutputsParams(json=t.parameters,
                                                             source_param=f"tools[{i}].function.parameters"))
        spec = StructuredOutputsParams(grammar=self.parser.forced_grammar(req.callable, req.parallel),
                                       source_param="tools")
        return dataclasses.replace(sampling, structured_outputs=spec)

    def new_parser(self) -> ToolParser | None:
        """A parser for one answer (None: leave the answer as content)."""
        if self.parser is None or self.request.choice == "none":
            return None
        return self.parser(max_calls=None if self.request.parallel else 1)

    def finish_reason(self, called: bool, finish: str | None) -> str | None:
        choice = self.request.choice
        if called and (choice == "auto" or (choice == "required" and finish == "stop")):
            return "tool_calls"
        return finish
