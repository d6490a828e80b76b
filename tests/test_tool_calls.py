"""Tool calls end to end (issue 11, "Tool calls"): offline `LLM.chat(tools=...)`, and the served stack (the
session's stage processes, a gateway process with --enable-auto-tool-choice --tool-call-parser hermes) through
the official `openai` client and through `mmpipe.client` (the public gRPC API), streaming and not. A tiny
random model writes random words, so every valid call below is the grammar's doing; each is checked against its function's schema with jsonschema. Tool results go
back through the chat template: the prompt's token ids equal transformers' `apply_chat_template(tools=...)`.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from services_helpers import start_gateway_process

from mmpipe import SamplingParams
from mmpipe.shared.tools import get_tool_parser

WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "unit"],
    "additionalProperties": False}
ADD_PARAMS = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                               "b": {"type": "integer", "minimum": -99, "maximum": 99}},
              "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                           "parameters": ADD_PARAMS}}]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "add": ADD_PARAMS}
ASK = [{"role": "user", "content": "What is the weather in Paris? And what is 2 + 3?"}]
NAMED = {"type": "function", "function": {"name": "add"}}


def check_call(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


# ---- offline -----------------------------------------------------------------------------------------------
def test_offline_chat_renders_tools_and_enforces_required(qwen2_vl_dir):
    from transformers import AutoTokenizer

    from mmpipe import LLM

    llm = LLM(qwen2_vl_dir, device="cpu")
    tok = AutoTokenizer.from_pretrained(qwen2_vl_dir)
    sp = SamplingParams(temperature=0, max_tokens=160)
    out = llm.chat(ASK, sp, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, use_tqdm=False)[0]
    # the prompt is transformers' rendering of the same conversation and tools
    assert out.prompt == tok.apply_chat_template(ASK, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "get_weather" in out.prompt and "<tools>" in out.prompt
    calls = get_tool_parser("hermes")().extract(out.outputs[0].text).tool_calls
    assert len(calls) == 1 and out.outputs[0].finish_reason == "stop"
    check_call(calls[0].name, calls[0].arguments)
    # vLLM's LLM.chat(tools=...): rendered, not enforced; free text from a random model
    free = llm.chat(ASK, SamplingParams(temperature=0, max_tokens=8), tools=TOOLS, use_tqdm=False)[0]
    assert free.prompt == out.prompt and "<tool_call>" not in free.outputs[0].text


# ---- served ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gateway(stage_stack, qwen2_vl_dir, tmp_path_factory):
    addrs = {"ingest": stage_stack.ingest_addr, "encoder": stage_stack.encoder_addr,
             "generator": stage_stack.generator_addr}
    gw = start_gateway_process(qwen2_vl_dir, addrs, tmp_path_factory.mktemp("gw-tools"),
                               ["--shutdown-grace-s", "5", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    try:
        gw.wait_healthy()
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def grpc_client(gateway):
    from mmpipe.client import MMPipeClient

    with MMPipeClient(gateway.grpc_addr, timeout=120) as c:
        yield c


def _streamed(chunks) -> tuple[str, list[tuple[str, str, str]], str | None]:
    """(content, [(id, name, arguments)], finish_reason) assembled from stream deltas as a client does."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                if tc.index not in calls:  # a call's first delta: id, type and name, then argument fragments
                    assert tc.id and tc.type == "function" and tc.function.name, tc
                    calls[tc.index] = [tc.id, tc.function.name, ""]
                else:
                    assert tc.id is None and not tc.function.name
                calls[tc.index][2] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize("choice", ["required", NAMED])
def test_served_forced_calls_validate_streaming_and_not(client, choice):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
              temperature=0, max_tokens=160)
    c = client.chat.completions.create(**kw).choices[0]
    assert c.finish_reason == ("tool_calls" if choice == "required" else "stop")  # OpenAI's finish reasons
    assert len(c.message.tool_calls) == 1 and not c.message.content
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert choice == "required" or call.function.name == "add"
    args = check_call(call.function.name, call.function.arguments)
    content, calls, finish = _streamed(client.chat.completions.create(stream=True, **kw))
    assert finish == c.finish_reason and content == "" and len(calls) == 1
    assert calls[0][1] == call.function.name and check_call(calls[0][1], calls[0][2]) == args  # same greedy call


def test_served_auto_parses_calls_and_leaves_free_text_as_content(client):
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, max_tokens=160,
              extra_body={"structured_outputs": {"choice": [call_text]}})  # makes the model write a call
    c = client.chat.completions.create(**kw).choices[0]
    assert c.finish_reason == "tool_calls" and [t.function.name for t in c.message.tool_calls] == ["get_weather"]
    assert check_call("get_weather", c.message.tool_calls[0].function.arguments) == {"city": "Paris",
                                                                                     "unit": "celsius"}
    content, calls, finish = _streamed(client.chat.completions.create(stream=True, **kw))
    assert finish == "tool_calls" and content == "" and [n for _, n, _ in calls] == ["get_weather"]
    assert json.loads(calls[0][2]) == {"city": "Paris", "unit": "celsius"}
    # the random model's own words are no call: content, and the engine's finish reason
    free = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0,
                                          max_tokens=12).choices[0]
    assert free.message.tool_calls is None and free.message.content and free.finish_reason in ("stop", "length")
    content, calls, finish = _streamed(client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=12, stream=True))
    assert calls == [] and content == free.message.content and finish == free.finish_reason


def test_served_tool_results_go_back_through_the_template(client, qwen2_vl_dir):
    from transformers import AutoTokenizer

    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=160)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}]
    c = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0, max_tokens=4,
                                       extra_body={"return_token_ids": True})
    # the oracle: transformers' template call with the arguments as an object (as vLLM passes them)
    oracle_msgs = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": json.loads(call.function.arguments)}}]},
        messages[-1]]
    tok = AutoTokenizer.from_pretrained(qwen2_vl_dir)
    text = tok.apply_chat_template(oracle_msgs, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "<tool_response>\n22 degrees and sunny\n</tool_response>" in text and "<tool_call>" in text
    assert c.prompt_token_ids == tok(text, add_special_tokens=False).input_ids


def test_served_tokenize_with_tools_is_the_chat_prompt(client, gateway):
    """POST /tokenize with messages and tools gives exactly the prompt the chat endpoint builds (its ids and
    usage.prompt_tokens: no media here, so nothing is expanded); a template input that neither implements stays a
    400 naming it."""
    chat = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=2,
                                          extra_body={"return_token_ids": True})
    for kw in ({}, {"tool_choice": "required", "parallel_tool_calls": False}):
        t = httpx.post(f"{gateway.url}/tokenize", json={"model": "tiny", "messages": ASK, "tools": TOOLS, **kw},
                       timeout=60)
        assert t.status_code == 200, t.text
        assert t.json()["tokens"] == chat.prompt_token_ids and t.json()["count"] == chat.usage.prompt_tokens, kw
    bare = httpx.post(f"{gateway.url}/tokenize", json={"messages": ASK}, timeout=60).json()
    assert bare["count"] < chat.usage.prompt_tokens  # the tools are in the template's text
    # the public gRPC API's Tokenize takes the same tools (and refuses them, by name, on a text prompt)
    from mmpipe.client import MMPipeClient
    from mmpipe.shared.errors import InvalidInputError

    with MMPipeClient(gateway.grpc_addr, timeout=120) as c:
        for kw in ({}, {"tool_choice": "required", "parallel_tool_calls": False}):
            assert c.tokenize(messages=ASK, tools=TOOLS, **kw).tokens == chat.prompt_token_ids, kw
        with pytest.raises(InvalidInputError) as ei:
            c.tokenize(messages=ASK, tools=[{"type": "function", "function": {"name": "bad name"}}])
        assert ei.value.param == "tools[0].function.name"
        with pytest.raises(InvalidInputError) as ei:
            c.tokenize("hi", tools=TOOLS)
        assert ei.value.param == "tools"
    r = httpx.post(f"{gateway.url}/tokenize", json={"messages": ASK, "tools": TOOLS, "continue_final_message": True},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message", r.text


@pytest.mark.parametrize("kw, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_served_bad_tool_requests_are_400s_naming_the_field(client, kw, param):
    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(**body)
    assert ei.value.status_code == 400 and ei.value.body.get("param") == param, ei.value.body
    ok = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=2)
    assert ok.choices[0].message.tool_calls is None  # still serving; "none": never parsed


def test_auto_without_enable_auto_tool_choice_is_a_400(qwen2_vl_dir):
    """vLLM's behaviour, on the real app in-process (no stage is reached: the check comes first)."""
    from mmpipe.services.gateway.config import GatewayConfig
    from mmpipe.services.gateway.core import GatewayCore
    from mmpipe.services.gateway.http.app import build_app
    from mmpipe.services.gateway.model_info import load_model_info
    from mmpipe.services.gateway.stages import StageClients
    from mmpipe.shared.cache.embedded_redis import free_port

    async def go():
        down = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        app = build_app(GatewayCore(GatewayConfig(model=qwen2_vl_dir, served_model_names=("tiny",)),
                                    load_model_info(qwen2_vl_dir), StageClients(*down)))
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw/v1")
        async with openai.AsyncOpenAI(base_url="http://gw/v1", api_key="-", http_client=http, max_retries=0) as c:
            params = []
            for extra in ({}, {"tool_choice": "auto"}):
                with pytest.raises(openai.BadRequestError) as ei:
                    await c.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=2, **extra)
                assert "--enable-auto-tool-choice" in ei.value.message
                params.append(ei.value.body.get("param"))
            return params

    assert asyncio.run(go()) == ["tools", "tool_choice"]


def test_gateway_flags_follow_vllm():
    import argparse

    from mmpipe.services.gateway.config import add_cli_args, config_from_args
    from mmpipe.shared.errors import InvalidInputError

    parse = add_cli_args(argparse.ArgumentParser()).parse_args
    cfg = config_from_args(parse(["--model", "m", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]))
    assert cfg.enable_auto_tool_choice and cfg.tool_call_parser == "hermes"
    for argv in (["--enable-auto-tool-choice"], ["--tool-call-parser", "nope"]):
        with pytest.raises(InvalidInputError) as ei:
            config_from_args(parse(["--model", "m", *argv]))
        assert ei.value.param == "--tool-call-parser"


def test_mmpipe_serve_takes_the_tool_flags_and_checks_them_before_starting(capsys):
    import argparse

    from mmpipe.commands import serve

    sub = argparse.ArgumentParser().add_subparsers()
    p = serve.add_parser(sub)
    args = p.parse_args(["m", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    assert args.enable_auto_tool_choice and args.tool_call_parser == "hermes"
    assert serve.run(p.parse_args(["m", "--enable-auto-tool-choice"])) == 2  # nothing was started
    assert "--tool-call-parser" in capsys.readouterr().err


# ---- the public gRPC API through mmpipe.client (the same gateway process) ----------------------------------
@pytest.mark.parametrize("choice", ["required", NAMED])
def test_grpc_forced_calls_validate_streaming_and_not(grpc_client, choice):
    kw = dict(tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, temperature=0, max_tokens=160)
    out = grpc_client.chat(ASK, **kw)
    assert out.finish_reason == ("tool_calls" if choice == "required" else "stop") and out.text == ""
    assert len(out.tool_calls) == 1 and out.tool_calls[0].id.startswith("call_") and out.token_ids
    call = out.tool_calls[0]
    assert choice == "required" or call.name == "add"
    args = check_call(call.name, call.arguments)
    chunks = list(grpc_client.chat(ASK, stream=True, **kw))
    pieces = [d for c in chunks for d in c.tool_calls]
    assert pieces[0].id and pieces[0].name == call.name and all(p.id is None and p.name is None for p in pieces[1:])
    assert {p.index for p in pieces} == {0} and "".join(c.text for c in chunks) == ""
    assert check_call(pieces[0].name, "".join(p.arguments for p in pieces)) == args  # the same greedy call
    assert chunks[-1].finish_reason == out.finish_reason


def test_grpc_tool_results_go_back_through_the_template(grpc_client, qwen2_vl_dir):
    from transformers import AutoTokenizer

    call = grpc_client.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0,
                            max_tokens=160).tool_calls[0]
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}]
    # prompt_logprobs return the prompt's token ids (all but the first) as the gateway rendered them
    out = grpc_client.chat(messages, tools=TOOLS, temperature=0, max_tokens=1, prompt_logprobs=0)
    oracle = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": json.loads(call.arguments)}}]},
        messages[-1]]
    tok = AutoTokenizer.from_pretrained(qwen2_vl_dir)
    text = tok.apply_chat_template(oracle, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "<tool_response>\n22 degrees and sunny\n</tool_response>" in text and "<tool_call>" in text
    ids = tok(text, add_special_tokens=False).input_ids
    assert out.usage["prompt_tokens"] == len(ids) and [p[0] for p in out.prompt_logprobs[1:]] == ids[1:]


@pytest.mark.parametrize("kw, param", [
    ({"tool_choice": NAMED | {"function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required", "parallel_tool_calls": False, "messages": ASK + [
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "add", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_grpc_bad_tools_are_invalid_argument_naming_the_field(grpc_client, kw, param):
    from mmpipe.shared.errors import InvalidInputError

    kw = {"tools": TOOLS, "max_tokens": 4, **kw}
    with pytest.raises(InvalidInputError) as ei:
        grpc_client.chat(kw.pop("messages", ASK), **kw)
    assert ei.value.grpc_code == "INVALID_ARGUMENT" and ei.value.param == param, (ei.value.param, ei.value.message)
    ok = grpc_client.chat(ASK, tools=TOOLS, tool_choice="none", max_tokens=2)
    assert ok.tool_calls == [] and ok.finish_reason in ("stop", "length")  # still serving; "none": never parsed
