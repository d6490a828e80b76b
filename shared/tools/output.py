"""A request's answers read through its `ToolPlan`: whole (`read_answer`) or streamed (`ToolCallStreams`).

The one place that decides what an answer's content, tool calls and finish reason are, for every transport: the
HTTP chat endpoint (message.tool_calls / stream deltas) and the public gRPC API (CompletionChunk.tool_calls).
Each choice (n > 1) is parsed on its own. Without a plan, or with tool_choice "none", the answer is content.
"""
from __future__ import annotations

from .parsers import StreamDelta, ToolCall, ToolCallStream
from .plan import ToolPlan


def read_answer(plan: ToolPlan | None, text: str, finish: str | None
                ) -> tuple[str | None, list[ToolCall], str | None]:
    """(content, tool calls, finish reason) of one whole answer."""
    parser = plan.new_parser() if plan is not None else None
    if parser is None:
        return text, [], finish
    found = parser.extract(text)
    if not found.tool_calls:
        return text, [], plan.finish_reason(False, finish)
    return found.content, found.tool_calls, plan.finish_reason(True, finish)


class ToolCallStreams:
    """The streaming state of one request's answers: one parser stream per choice index."""

    def __init__(self, plan: ToolPlan | None):
        self.plan = plan
        self.parses = plan is not None and plan.new_parser() is not None
        self._streams: dict[int, ToolCallStream] = {}

    def feed(self, index: int, text: str, finish: str | None) -> tuple[StreamDelta, str | None]:
        """Choice `index`'s next text delta (and its finish reason on its last one) -> what can be sent now (text
        that may begin a call is held back) and the finish reason to send."""
        if not self.parses:
            return StreamDelta(content=text), finish
        calls = self._streams.get(index)
        if calls is None:
            calls = self._streams[index] = self.plan.new_parser().stream()
        part = calls.feed(text)
        if finish is not None:
            part.extend(calls.finish())
            finish = self.plan.finish_reason(calls.called, finish)
        return part, finish
