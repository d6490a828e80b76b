"""What every tool-call parser produces and the interface it implements.

A parser reads one output format (`--tool-call-parser NAME`): `extract(text)` turns a whole answer into content
plus tool calls, `stream()` gives a per-request state that turns text deltas into OpenAI stream deltas (a call's
index, id, type and name first, then fragments of its arguments), and `forced_grammar(tools, parallel)` is the
grammar (llguidance's Lark) of "one or more calls to these functions" in the same format, which enforces
tool_choice "required" or a named function. Output that is not a well-formed call is content, never an error.
"""
from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..request import FunctionTool


def make_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    """One call as OpenAI returns it: `arguments` is the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ExtractedToolCalls:
    content: str | None
    tool_calls: list[ToolCall]


@dataclass(frozen=True)
class DeltaToolCall:
    """A piece of call `index`: its first piece has id and name (and "" arguments), later ones arguments only."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        fn: dict[str, Any] = {}
        if self.name is not None:
            fn["name"] = self.name
        if self.arguments is not None:
            fn["arguments"] = self.arguments
        out["function"] = fn
        return out


@dataclass
class StreamDelta:
    """What one text delta adds: content text and tool-call pieces (either may be empty)."""

    content: str = ""
    tool_calls: list[DeltaToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)

    def extend(self, other: "StreamDelta") -> "StreamDelta":
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)
        return self

    def merged_calls(self) -> list[DeltaToolCall]:
        """The pieces with consecutive ones of one call joined (a name and its first fragments: one piece)."""
        out: list[DeltaToolCall] = []
        for p in self.tool_calls:
            last = out[-1] if out else None
            if last is not None and last.index == p.index and p.id is None and p.name is None:
                out[-1] = DeltaToolCall(last.index, last.id, last.name, (last.arguments or "") + (p.arguments or ""))
            else:
                out.append(p)
        return out


class ToolCallStream(ABC):
    """The streaming state of one answer."""

    @abstractmethod
    def feed(self, text: str) -> StreamDelta:
        """The next text delta of the answer -> what can be sent now (text that may begin a call is held)."""

    @abstractmethod
    def finish(self) -> StreamDelta:
        """The answer ended: whatever was held back."""

    @property
    @abstractmethod
    def called(self) -> bool:
        """At least one call was streamed."""


class ToolParser(ABC):
    """`max_calls`: calls past this many are dropped (1 when the request sets parallel_tool_calls=false)."""

    name: ClassVar[str]

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls

    @abstractmethod
    def extract(self, text: str) -> ExtractedToolCalls: ...

    @abstractmethod
    def stream(self) -> ToolCallStream: ...

    @classmethod
    @abstractmethod
    def forced_grammar(cls, tools: Sequence[FunctionTool], parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect) whose every sentence is one call (or, with `parallel`, several)
        to one of `tools`, with arguments that validate against the function's parameters schema."""
