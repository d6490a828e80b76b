"""The `hermes` format of the Qwen families (Qwen2.5, Qwen2.5-VL, Qwen2.5-Omni, ...; vLLM's `hermes` parser):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, blocks separated by a newline. Whole answers follow vLLM: every block must be a JSON object
with a string `name` and an object `arguments` (a JSON string holding one is accepted too), else the whole answer
is content; text outside the blocks is content (whitespace between calls is not). Streaming sends a call's id
and name once `{"name": "...", "arguments": ` has arrived, then its arguments as they come, ending where the
arguments value ends (a string-aware scan of its brackets); text that may be the start of `<tool_call>` is held
back until it is not. A block written in another key order is sent whole once `</tool_call>` arrives.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence

from ..request import FunctionTool
from . import register_tool_parser
from .base import (DeltaToolCall, ExtractedToolCalls, StreamDelta, ToolCall, ToolCallStream, ToolParser,
                   make_call_id)

log = logging.getLogger(__name__)

START, END = "<tool_call>", "</tool_call>"
_BLOCKS = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)
_WS = " \t\r\n"
# What a block must begin with for its name and arguments to be streamed (the order Qwen's template shows).
_HEAD = ("ws", "{", "ws", '"name"', "ws", ":", "ws", "str", "ws", ",", "ws", '"arguments"', "ws", ":", "ws")
_MATCH, _PARTIAL, _FAIL = "match", "partial", "fail"


def _call_of(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of one block's text, or None when it is not a well-formed call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _head(buf: str) -> tuple[str, str | None, int]:
    """Match `_HEAD` at the start of a block: (_MATCH, name, end), (_PARTIAL, ...) while `buf` may still become
    one, (_FAIL, ...) once it cannot."""
    i, n, name = 0, len(buf), None
    for piece in _HEAD:
        if piece == "ws":
            while i < n and buf[i] in _WS:
                i += 1
            if i == n:
                return _PARTIAL, None, 0
        elif piece == "str":
            if buf[i] != '"':
                return _FAIL, None, 0
            j = i + 1
            while j < n and buf[j] != '"':
                j += 2 if buf[j] == "\\" else 1
            if j >= n:
                return _PARTIAL, None, 0
            try:
                name = json.loads(buf[i:j + 1])
            except ValueError:
                return _FAIL, None, 0
            i = j + 1
        else:
            k = min(len(piece), n - i)
            if buf[i:i + k] != piece[:k]:
                return _FAIL, None, 0
            if k < len(piece):
                return _PARTIAL, None, 0
            i += k
    return _MATCH, name, i


class _ValueScan:
    """Where one JSON value ends, fed piece by piece (strings and escapes respected)."""

    def __init__(self) -> None:
        self.started = self.scalar = self.in_str = self.esc = False
        self.depth = 0

    def feed(self, s: str) -> tuple[int, bool]:
        """(characters of `s` that belong to the value, whether the value ended)."""
        for k, c in enumerate(s):
            if not self.started:
                if c in _WS:
                    continue
                self.started = True
                if c in "{[":
                    self.depth = 1
                elif c == '"':
                    self.in_str = True
                else:
                    self.scalar = True
            elif self.scalar:
                if c in ",}]" or c in _WS:
                    return k, True
            elif self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                    if self.depth == 0:
                        return k + 1, True
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return k + 1, True
        return len(s), False


def _held_prefix(buf: str) -> int:
    """Length of the longest end of `buf` that is a proper beginning of START (held back: it may be one)."""
    for k in range(min(len(START) - 1, len(buf)), 0, -1):
        if START.startswith(buf[-k:]):
            return k
    return 0


class _HermesStream(ToolCallStream):
    def __init__(self, max_calls: int | None):
        self.max_calls = max_calls
        self.buf = ""
        self.mode = "text"  # text | head | whole | args | tail | skip
        self.count = 0  # calls started
        self.ws = ""  # whitespace after a call, sent only if more text follows
        self.scan = _ValueScan()

    @property
    def called(self) -> bool:
        return self.count > 0

    def _allowed(self) -> bool:
        return self.max_calls is None or self.count < self.max_calls

    def _content(self, out: StreamDelta, text: str) -> None:
        if self.count and not (self.ws + text).strip():
            self.ws += text
            return
        out.content += self.ws + text
        self.ws = ""

    def _call(self, out: StreamDelta, name: str, arguments: str) -> None:
        if self._allowed():
            out.tool_calls.append(DeltaToolCall(self.count, make_call_id(), name, arguments))
            self.count += 1

    def feed(self, text: str) -> StreamDelta:
        self.buf += text
        out = StreamDelta()
        while self._step(out):
            pass
        return out

    def _step(self, out: StreamDelta) -> bool:
        """Advance as far as the buffer allows; True when the mode changed (so step again)."""
        buf = self.buf
        if self.mode == "text":
            i = buf.find(START)
            if i < 0:
                keep = _held_prefix(buf)
                if len(buf) > keep:
                    self._content(out, buf[:len(buf) - keep])
                self.buf = buf[len(buf) - keep:]
                return False
            if i:
                self._content(out, buf[:i])
            self.buf, self.mode = buf[i + len(START):], "head"
            return True
        if self.mode == "head":
            status, name, end = _head(buf)
            if status == _MATCH:
                if not self._allowed():
                    self.mode = "skip"
                    return True
                out.tool_calls.append(DeltaToolCall(self.count, make_call_id(), name, ""))
                self.count += 1
                self.buf, self.mode, self.scan = buf[end:], "args", _ValueScan()
                return True
            if status == _FAIL or END in buf:
                self.mode = "whole"
                return True
            return False
        if self.mode == "args":
            n, done = self.scan.feed(buf)
            if n:
                out.tool_calls.append(DeltaToolCall(self.count - 1, arguments=buf[:n]))
            self.buf = buf[n:]
            if done:
                self.mode = "tail"
                return True
            return False
        j = buf.find(END)
        if j < 0:
            if self.mode == "skip":  # nothing of a dropped call is kept but what may be the start of END
                self.buf = buf[-(len(END) - 1):]
            return False
        body, self.buf = buf[:j], buf[j + len(END):]
        if self.mode == "whole":
            call = _call_of(body)
            if call is None:
                self._content(out, START + body + END)
            else:
                self._call(out, *call)
        elif self.mode == "tail" and body.strip() != "}":
            log.debug("tool call closed by %r instead of '}'", body[:40])
        self.mode = "text"
        return True

    def finish(self) -> StreamDelta:
        out = StreamDelta()
        if self.mode == "text" and self.buf:
            self._content(out, self.buf)
        elif self.mode in ("head", "whole"):  # an unterminated block at the end (vLLM reads those too)
            call = _call_of(self.buf)
            if call is None:
                self._content(out, START + self.buf)
            else:
                self._call(out, *call)
        self.buf = ""
        return out


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    def extract(self, text: str) -> ExtractedToolCalls:
        if START not in text:
            return ExtractedToolCalls(text, [])
        calls: list[ToolCall] = []
        content, pos = [], 0
        for m in _BLOCKS.finditer(text):
            call = _call_of(m.group(1) if m.group(1) is not None else m.group(2))
            if call is None:
                return ExtractedToolCalls(text, [])  # not a tool call after all: the answer is content
            calls.append(ToolCall(make_call_id(), *call))
            piece = text[pos:m.start()]
            if not calls[:-1] or piece.strip():  # text before the first call as is; whitespace between calls not
                content.append(piece)
            pos = m.end()
        if text[pos:].strip():
            content.append(text[pos:])
        if self.max_calls is not None:
            calls = calls[:self.max_calls]
        joined = "".join(content)
        return ExtractedToolCalls(joined if joined.strip() else None, calls)

    def stream(self) -> ToolCallStream:
        return _HermesStream(self.max_calls)

    @classmethod
    def forced_grammar(cls, tools: Sequence[FunctionTool], parallel: bool) -> str:
        rules = []
        for k, t in enumerate(tools):
            head = START + '\n{"name": ' + json.dumps(t.name) + ', "arguments": '
            schema = {**t.parameters, "x-guidance": {"whitespace_flexible": False}}  # compact, as structured outputs
            rules.append(f"fn_{k}: {json.dumps(head)} args_{k} {json.dumps(chr(125) + chr(10) + END)}")
            rules.append(f"args_{k}: %json {json.dumps(schema)}")
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        return "\n".join([start, "call: " + " | ".join(f"fn_{k}" for k in range(len(tools))), *rules])
