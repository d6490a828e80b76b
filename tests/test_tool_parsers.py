"""Tool calls without a model (issue 11, "Tool calls"): the request rules (vLLM's), the plan (flags, finish
reasons, grammar conflicts), and the hermes parser on whole answers, on answers streamed in every split
(the deltas must add up to the whole answer's calls), on malformed output (returned as content), and its
forced-call grammar checked token by token by llguidance against a tiny model's tokenizer."""
from __future__ import annotations

import json
import random

import pytest

from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.tools import ToolPlan, ToolSettings, get_tool_parser, parse_tool_request
from mmpipe.shared.types import SamplingParams

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                                                "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}

CALL_1 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris {x}", "unit": "c"}}\n</tool_call>'
CALL_2 = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, {"c": "]}"}]}}\n</tool_call>'
ANSWERS = [
    CALL_1,
    "Let me check. " + CALL_1 + "\n" + CALL_2,
    "no call here, just < and <tool and <tool_cal text",
    CALL_2 + "\nDone.",
    '<tool_call>\n{"arguments": {"a": 1}, "name": "add"}\n</tool_call>',  # other key order: sent whole
    '<tool_call>\n{"name": "add", "arguments": {"a": 1}}',  # unterminated at the end (vLLM reads it too)
]


def hermes(max_calls=None):
    return get_tool_parser("hermes")(max_calls=max_calls)


def streamed(text: str, pieces: list[int], max_calls=None):
    """Feed `text` cut at `pieces`, then finish: (content, [(id, name, arguments)], first pieces)."""
    s = hermes(max_calls).stream()
    content, calls, firsts = "", {}, []
    cuts = [0, *sorted(pieces), len(text)]
    deltas = [s.feed(text[a:b]) for a, b in zip(cuts, cuts[1:])] + [s.finish()]
    for d in deltas:
        content += d.content
        for c in d.merged_calls():
            if c.index not in calls:
                assert c.id and c.id.startswith("call_") and c.name and c.arguments is not None
                firsts.append(c)
                calls[c.index] = [c.id, c.name, ""]
            else:
                assert c.id is None and c.name is None
            calls[c.index][2] += c.arguments or ""
    assert s.called == bool(calls)
    return content, [tuple(calls[i]) for i in sorted(calls)], firsts


# ---- whole answers -------------------------------------------------------------------------------------------
def test_extract_calls_and_content():
    got = hermes().extract("Let me check. " + CALL_1 + "\n" + CALL_2)
    assert got.content == "Let me check. "
    assert [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == [
        ("get_weather", {"city": 'Pa"ris {x}', "unit": "c"}), ("add", {"a": 1, "b": [2, {"c": "]}"}]})]
    assert len({c.id for c in got.tool_calls}) == 2
    assert hermes(max_calls=1).extract(CALL_1 + "\n" + CALL_2).tool_calls[0].name == "get_weather"
    assert len(hermes(max_calls=1).extract(CALL_1 + "\n" + CALL_2).tool_calls) == 1
    # arguments given as a JSON string are read too; an unterminated last block is read (vLLM's regex)
    s = hermes().extract('<tool_call>{"name": "add", "arguments": "{\\"a\\": 2}"}</tool_call>')
    assert json.loads(s.tool_calls[0].arguments) == {"a": 2} and s.content is None
    assert hermes().extract(ANSWERS[5]).tool_calls[0].name == "add"


@pytest.mark.parametrize("text", [
    "plain text <b>bold</b>",
    "<tool_call>\nnot json\n</tool_call>",
    '<tool_call>{"name": "add", "arguments": {"a": 1}</tool_call>',  # one brace short
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>{"name": "add", "arguments": [1]}</tool_call>',  # arguments not an object
    CALL_1 + "<tool_call>{broken</tool_call>",  # one bad block: the whole answer is content (vLLM)
])
def test_malformed_output_is_content(text):
    got = hermes().extract(text)
    assert got.tool_calls == [] and got.content == text


# ---- streamed answers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ANSWERS)
def test_every_split_of_the_stream_gives_the_whole_answers_calls(text):
    whole = hermes().extract(text)
    rng = random.Random(len(text))
    splits = [[], list(range(1, len(text)))]  # one piece, one character at a time, then random cuts
    splits += [rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))) for _ in range(20)]
    for cuts in splits:
        content, calls, firsts = streamed(text, cuts)
        assert [(n, json.loads(a)) for _, n, a in calls] == [(c.name, json.loads(c.arguments))
                                                             for c in whole.tool_calls], (text, cuts)
        assert content == (whole.content or ""), (text, cuts)


def test_stream_sends_the_name_before_the_arguments_end():
    s = hermes().stream()
    assert s.feed("<tool").content == ""  # may be the start of <tool_call>: held
    d = s.feed('_call>\n{"name": "get_weather", "arguments": {"ci')
    assert d.content == "" and [(c.index, c.name, c.arguments) for c in d.merged_calls()] == [
        (0, "get_weather", '{"ci')]
    d = s.feed('ty": "Paris"}}\n</tool_call>')
    assert [(c.index, c.id, c.arguments) for c in d.tool_calls] == [(0, None, 'ty": "Paris"}')]
    assert not s.finish() and s.called


def test_malformed_streamed_block_comes_out_as_content():
    text = "<tool_call>\n[1, 2]\n</tool_call> and <toolbox"
    content, calls, _ = streamed(text, [3, 12, 20])
    assert calls == [] and content == text


def test_stream_keeps_only_the_first_call_without_parallel_tool_calls():
    content, calls, _ = streamed(CALL_1 + "\n" + CALL_2, [30, 60, 95], max_calls=1)
    assert [n for _, n, _ in calls] == ["get_weather"] and content == ""


# ---- request rules -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tools, choice, param", [
    ("x", None, "tools"),
    (["x"], None, "tools[0]"),
    ([{"type": "retrieval", "function": {"name": "a"}}], None, "tools[0].type"),
    ([{"type": "function"}], None, "tools[0].function"),
    ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "a" * 65}}], None, "tools[0].function.name"),
    ([WEATHER, {"type": "function", "function": {"name": "a", "parameters": []}}], None,
     "tools[1].function.parameters"),
    ([{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}], None,
     "tools[0].function.parameters.type"),
    ([{"type": "function", "function": {"name": "a", "description": 3}}], None, "tools[0].function.description"),
    ([WEATHER, WEATHER], None, "tools[1].function.name"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "add"}}, "tool_choice.function.name"),
    ([WEATHER], {"type": "function", "function": {}}, "tool_choice.function.name"),
    ([WEATHER], {"type": "function"}, "tool_choice.function"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_name_the_field(tools, choice, param):
    with pytest.raises(InvalidInputError) as ei:
        parse_tool_request(tools, choice)
    assert ei.value.param == param, ei.value.message


def test_tool_choice_defaults_follow_vllm():
    assert parse_tool_request(None, None) is None and parse_tool_request(None, "none") is None
    assert parse_tool_request([WEATHER]).choice == "auto"
    assert parse_tool_request([], "required").choice == "none"  # nothing to require
    named = parse_tool_request([WEATHER, ADD], {"type": "function", "function": {"name": "add"}}, False)
    assert (named.choice, named.function, named.parallel, [t.name for t in named.callable]) == (
        "function", "add", False, ["add"])
    assert parse_tool_request([ADD]).tools[0].to_template() == ADD
    with pytest.raises(InvalidInputError) as ei:
        parse_tool_request([ADD], "auto", "yes")
    assert ei.value.param == "parallel_tool_calls"


# ---- plan ----------------------------------------------------------------------------------------------------
def test_plan_needs_the_flag_for_auto_and_maps_finish_reasons():
    on = ToolSettings(True, "hermes")
    for choice, param in ((None, "tools"), ("auto", "tool_choice")):  # vLLM: 400 without the flag
        with pytest.raises(InvalidInputError) as ei:
            ToolPlan.make(parse_tool_request([WEATHER], choice), ToolSettings())
        assert ei.value.param == param and "--enable-auto-tool-choice" in ei.value.message
    assert ToolPlan.make(parse_tool_request([WEATHER]), ToolSettings(), offline=True).new_parser() is None
    assert ToolPlan.make(parse_tool_request([WEATHER], "none"), on).new_parser() is None
    auto = ToolPlan.make(parse_tool_request([WEATHER]), on)
    assert auto.finish_reason(True, "stop") == "tool_calls" and auto.finish_reason(False, "length") == "length"
    req = ToolPlan.make(parse_tool_request([WEATHER], "required"), ToolSettings())  # no flag needed
    assert req.finish_reason(True, "stop") == "tool_calls" and req.finish_reason(True, "length") == "length"
    named = ToolPlan.make(parse_tool_request([WEATHER], {"type": "function", "function": {"name": "get_weather"}}),
                          on)
    assert named.finish_reason(True, "stop") == "stop"  # OpenAI and vLLM: a named function keeps "stop"
    with pytest.raises(InvalidInputError) as ei:
        req.sampling(SamplingParams(structured_outputs={"regex": "a+"}))
    assert ei.value.param == "tool_choice"
    with pytest.raises(InvalidInputError) as ei:
        ToolSettings(True, None)
    assert ei.value.param == "--tool-call-parser"
    with pytest.raises(InvalidInputError):
        ToolSettings(False, "no_such_parser")


# ---- the forced-call grammar, token by token -----------------------------------------------------------------
@pytest.fixture(scope="module")
def compiler():
    from transformers import AutoTokenizer

    from mmpipe.shared.models.tiny import ensure_tiny_model
    from mmpipe.shared.structured.grammar import GrammarCompiler

    return GrammarCompiler(AutoTokenizer.from_pretrained(ensure_tiny_model("qwen2_vl")))


def _accepts(compiler, spec, text: str) -> bool:
    m = compiler.matcher(spec)
    ids = compiler.hf_tokenizer(text, add_special_tokens=False).input_ids
    return all(m.consume_token(t) for t in ids) and m.is_accepting()


@pytest.mark.parametrize("parallel", [False, True])
def test_forced_grammar_accepts_valid_calls_only(compiler, parallel):
    req = parse_tool_request([WEATHER, ADD], "required", parallel)
    spec = ToolPlan.make(req, ToolSettings()).sampling(SamplingParams(), compiler).structured_outputs
    one = '<tool_call>\n{"name": "add", "arguments": {"a":1,"b":22}}\n</tool_call>'
    two = one + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city":"Rome"}}\n</tool_call>'
    assert _accepts(compiler, spec, one)
    assert _accepts(compiler, spec, two) == parallel
    assert not _accepts(compiler, spec, one.replace('"add"', '"sub"'))  # not a tool of the request
    assert not _accepts(compiler, spec, one.replace('"a":1', '"a":"x"'))  # arguments against the schema
    assert not _accepts(compiler, spec, "Sure! " + one)


def test_a_schema_the_grammar_engine_refuses_names_the_tool(compiler):
    bad = {"type": "function", "function": {"name": "neg", "parameters": {"type": "object", "not": {}}}}
    plan = ToolPlan.make(parse_tool_request([WEATHER, bad], "required"), ToolSettings())
    with pytest.raises(InvalidInputError) as ei:
        plan.sampling(SamplingParams(), compiler)
    assert ei.value.param == "tools[1].function.parameters"


def test_renders_tools_tells_tool_aware_templates_apart():
    from transformers import AutoProcessor

    from mmpipe.shared.chat.templates import FALLBACK_TEMPLATES, renders_tools
    from mmpipe.shared.models.tiny import ensure_tiny_model

    proc = AutoProcessor.from_pretrained(ensure_tiny_model("qwen2_vl"))
    assert renders_tools(proc, proc.chat_template)  # the tiny ChatML template, Qwen2.5-style
    assert not renders_tools(proc, FALLBACK_TEMPLATES["qwen2_vl"]) and not renders_tools(proc, None)


def test_tool_call_pieces_have_the_pydantic_wire_shape():
    """Stream chunks are written by hand (http/sse.py): each piece must be what DeltaMessage would dump."""
    from mmpipe.services.gateway.openai.chat_completion.protocol import ChatMessage, DeltaMessage
    from mmpipe.shared.tools.parsers import DeltaToolCall

    pieces = [DeltaToolCall(0, "call_1", "add", ""), DeltaToolCall(0, arguments='{"a": 1}'),
              DeltaToolCall(1, "call_2", "get_weather", '{"city": "x"}')]
    wire = [p.to_openai() for p in pieces]
    assert DeltaMessage.model_validate({"tool_calls": wire}).model_dump(exclude_none=True) == {"tool_calls": wire}
    call = hermes().extract(CALL_1).tool_calls[0].to_openai()
    assert ChatMessage.model_validate({"tool_calls": [call]}).model_dump(exclude_none=True)["tool_calls"] == [call]
