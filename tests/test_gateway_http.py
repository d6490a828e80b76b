"""The gateway's HTTP layer in-process (the real FastAPI app through httpx.ASGITransport), no stages running.

Covers what needs no stage: request validation and OpenAI-shaped errors with the right status codes, the
api key, request ids, unknown models, the placeholder and limit checks, the media policy pre-checks, a
down stage (503 + Retry-After), /health, /metrics, the gRPC <-> domain conversions, and SSE framing.
The end-to-end behaviour with real stage processes is in test_gateway_e2e.py.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from mmpipe.services.common.pb import gateway_pb2
from mmpipe.services.gateway.config import GatewayConfig
from mmpipe.services.gateway.core import GatewayCore
from mmpipe.services.gateway.grpc_api.servicer import chat_input_from_pb, completion_input_from_pb
from mmpipe.services.gateway.http import sse
from mmpipe.services.gateway.http.app import build_app
from mmpipe.services.gateway.model_info import load_model_info
from mmpipe.services.gateway.stages import StageClients
from mmpipe.shared.cache.embedded_redis import free_port
from mmpipe.shared.errors import InvalidInputError, ServiceUnavailableError

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def omni_dir() -> str:
    from mmpipe.shared.models.tiny import ensure_tiny_model

    return str(ensure_tiny_model("qwen2_5_omni"))


@pytest.fixture(scope="module")
def info(omni_dir):
    return load_model_info(omni_dir)


def _app(omni_dir, info, **cfg):
    # stage addresses where nothing listens: every stage call fails fast with UNAVAILABLE
    down = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    conf = GatewayConfig(model=omni_dir, served_model_names=("tiny",), api_key=KEY,
                         limit_mm_per_prompt={"image": 1}, allowed_media_domains=("127.0.0.1",),
                         allowed_local_media_path="/srv/media", **cfg)
    return build_app(GatewayCore(conf, info, StageClients(*down)))


def _calls(omni_dir, info, *requests: tuple) -> list[httpx.Response]:
    """(method, url[, body[, headers]]) requests, in order, against one app (built inside the event loop,
    where its gRPC channels live)."""
    async def go():
        app = _app(omni_dir, info)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            out = []
            for method, url, *rest in requests:
                body = rest[0] if rest else None
                headers = rest[1] if len(rest) > 1 else None
                out.append(await c.request(method, url, json=body, headers=headers))
            return out

    return asyncio.run(go())


def _call(omni_dir, info, *request) -> httpx.Response:
    return _calls(omni_dir, info, request)[0]


def _chat(content, **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}


def test_models_lists_served_name_and_needs_key(omni_dir, info):
    r = _call(omni_dir, info, "GET", "/v1/models", None, {**AUTH, "X-Request-Id": "req-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    assert [m["id"] for m in r.json()["data"]] == ["tiny"]
    for hdr in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = _call(omni_dir, info, "GET", "/v1/models", None, hdr)
        assert r.status_code == 401, hdr
        assert r.json()["error"]["type"] == "authentication_error"
        assert len(r.headers["x-request-id"]) == 32  # one was made up


@pytest.mark.parametrize("body, status, needle", [
    ({"model": "tiny"}, 400, "messages"),  # FastAPI validation -> 400, not 422
    ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    (_chat("hi", max_tokens=0), 400, "max_tokens"),
    (_chat("hi", n=17), 400, "--max-n"),  # n > 1 is served, up to the server's cap
    (_chat("hi", presence_penalty=2.5), 400, "presence_penalty"),
    (_chat("hi", repetition_penalty=0), 400, "repetition_penalty"),
    (_chat("hi", min_p=1.5), 400, "min_p"),
    (_chat("hi", logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    (_chat("hi", top_logprobs=2), 400, "top_logprobs"),
    (_chat("hi", logit_bias={"abc": 1}), 400, "logit_bias"),
    (_chat("hi", bad_words=[""]), 400, "bad_words"),
    (_chat("hi", prompt_logprobs=1, stream=True), 400, "prompt_logprobs"),
    (_chat("hi", prompt_logprobs=21), 400, "prompt_logprobs"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-9"),
    (_chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}] * 2), 400, "at most 1"),
    (_chat([{"type": "image_url", "image_url": None}]), 400, "uuid"),
    (_chat([{"type": "image_embeds", "image_embeds": "AAAA"}]), 400, "--enable-mm-embeds"),
    (_chat([{"type": "audio_embeds", "audio_embeds": "AAAA"}]), 400, "--enable-mm-embeds"),
    (_chat([{"type": "image_url", "image_url": {"url": "http://evil.example/x.png"}}]), 403, "evil.example"),
    (_chat([{"type": "video_url", "video_url": {"url": "file:///etc/passwd"}}]), 403, "outside"),
    (_chat([{"type": "video_url", "video_url": {"url": "file:///srv/media/../../etc/passwd"}}]), 403, "outside"),
    (_chat([{"type": "image_url", "image_url": {"url": "ftp://127.0.0.1/x.png"}}]), 403, "scheme"),
    (_chat([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}]), 400, "format"),
    (_chat([{"type": "sticker", "sticker": {}}]), 400, "sticker"),
    (_chat("hi", max_tokens=5000), 400, "max_model_len"),
])
def test_bad_chat_requests_are_clear_4xx(omni_dir, info, body, status, needle):
    r = _call(omni_dir, info, "POST", "/v1/chat/completions", body, AUTH)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert needle in err["message"] + str(err["param"])


def test_completion_placeholder_and_token_checks(omni_dir, info):
    r1, r2, r3, r4, r5 = _calls(
        omni_dir, info,
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "see <|IMAGE|>"}, AUTH),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": [1, 2, 10**6]}, AUTH),
        # a list of prompts: every one is checked before any is generated, so one bad prompt is a plain 400
        ("POST", "/v1/completions", {"model": "tiny", "prompt": ["a", "see <|IMAGE|>"]}, AUTH),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": [[1, 2], [3, 10**6]]}, AUTH),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": []}, AUTH))
    assert r1.status_code == 400 and "placeholder" in r1.json()["error"]["message"]
    assert r2.status_code == 400 and "token ids" in r2.json()["error"]["message"]
    assert r3.status_code == 400 and "placeholder" in r3.json()["error"]["message"]
    assert r4.status_code == 400 and "token ids" in r4.json()["error"]["message"]
    assert r5.status_code == 400 and r5.json()["error"]["param"] == "prompt"


_CMPL = {"model": "tiny", "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {**_CMPL, "suffix": "!"}, "suffix"),
    ("/v1/completions", {**_CMPL, "best_of": 2}, "best_of"),
    ("/v1/completions", {**_CMPL, "echo": True, "logprobs": 0, "stream": True, "prompt_logprobs": 1},
     "prompt_logprobs"),
    ("/v1/completions", {**_CMPL, "prompt_embeds": "AAAA"}, "prompt_embeds"),
    ("/v1/completions", {**_CMPL, "return_tokens_as_token_ids": True}, "return_tokens_as_token_ids"),
    ("/v1/completions", {**_CMPL, "spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
    ("/v1/completions", {**_CMPL, "guided_json": {"type": "object"}}, "guided_json"),
    ("/v1/completions", {**_CMPL, "truncate_prompt_tokens": 4}, "truncate_prompt_tokens"),
    ("/v1/chat/completions", _chat("hi", echo=True), "echo"),
    ("/v1/chat/completions", _chat("hi", vllm_xargs={"k": 1}), "vllm_xargs"),
])
def test_fields_that_change_the_answer_and_are_not_implemented_are_400(omni_dir, info, path, body, param):
    r = _call(omni_dir, info, "POST", path, body, AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_harmless_unknown_fields_are_ignored_with_a_warning(omni_dir, info, caplog):
    for path, body in (("/v1/completions", {**_CMPL, "priority": 3, "some_new_field": 1}),
                       ("/v1/chat/completions", _chat("hi", some_new_field=1))):
        caplog.clear()
        with caplog.at_level("WARNING"):
            r = _call(omni_dir, info, "POST", path, body, AUTH)
        assert r.status_code == 503, r.text  # accepted: it got as far as the (down) generator
        assert any("some_new_field" in rec.getMessage() for rec in caplog.records), path


def test_tokenize_and_detokenize_as_vllm(omni_dir, info):
    tok = info.tokenizer
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                                             {"type": "text", "text": "What is in it?"}]}]
    plain = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi"},
             {"role": "user", "content": "Count to three."}]
    rs = _calls(omni_dir, info,
                ("POST", "/tokenize", {"model": "tiny", "prompt": "The quick brown fox", "return_token_strs": True},
                 AUTH),
                ("POST", "/tokenize", {"prompt": "The quick brown fox", "add_special_tokens": False}, AUTH),
                ("POST", "/tokenize", {"model": "tiny", "messages": plain}, AUTH),
                ("POST", "/tokenize", {"messages": plain, "add_generation_prompt": False}, AUTH),
                ("POST", "/tokenize", {"messages": messages}, AUTH))
    want = tok("The quick brown fox").input_ids
    assert rs[0].status_code == 200, rs[0].text
    assert rs[0].json() == {"count": len(want), "max_model_len": info.max_model_len, "tokens": want,
                            "token_strs": tok.convert_ids_to_tokens(want)}
    assert rs[1].json()["tokens"] == tok("The quick brown fox", add_special_tokens=False).input_ids
    assert rs[1].json()["token_strs"] is None
    # chat: the model's own template through transformers (the oracle), then tokens without added specials
    for r, gen in ((rs[2], True), (rs[3], False)):
        text = info.processor.apply_chat_template(plain, add_generation_prompt=gen, tokenize=False)
        assert r.json()["tokens"] == tok(text, add_special_tokens=False).input_ids, gen
    assert rs[2].json()["count"] > rs[3].json()["count"]
    image_ids = rs[4].json()["tokens"]
    assert image_ids.count(info.placeholder_ids["image"]) == 1  # one placeholder per item, not expanded
    d = _calls(omni_dir, info, ("POST", "/detokenize", {"model": "tiny", "tokens": want}, AUTH),
               ("POST", "/detokenize", {"tokens": rs[2].json()["tokens"]}, AUTH))
    assert d[0].status_code == 200 and d[0].json() == {"prompt": tok.decode(want)}
    assert d[1].json()["prompt"] == info.processor.apply_chat_template(plain, add_generation_prompt=True,
                                                                     tokenize=False)


_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}]


def test_tokenize_renders_tools_as_the_chat_endpoint_does(omni_dir, info):
    """The oracle is transformers' template with the same tools; every tool choice renders all of them (the
    choice and the server's --enable-auto-tool-choice only matter to generation)."""
    plain = [{"role": "user", "content": "What is the weather in Paris?"}]
    rs = _calls(omni_dir, info, *[("POST", "/tokenize", {"messages": plain, "tools": _TOOLS, **kw}, AUTH)
                                  for kw in ({}, {"tool_choice": "required"}, {"tool_choice": "none"})],
                ("POST", "/tokenize", {"messages": plain}, AUTH))
    text = info.processor.apply_chat_template(plain, tools=_TOOLS, add_generation_prompt=True, tokenize=False)
    assert "get_weather" in text
    want = info.tokenizer(text, add_special_tokens=False).input_ids
    for r in rs[:3]:
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == want
    assert rs[3].json()["count"] < len(want)


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "tiny"}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", [1, 2], 400, None),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "sticker"}]}]}, 400, None),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True}, 400,
     "continue_final_message"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 1 }}"}, 400, "chat_template"),
    # the template inputs are checked by the chat endpoint's rules (shared/chat/template_options.py)
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": True}}, 400,
     "chat_template_kwargs.tokenize"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "documents": [{"text": 1}]}, 400,
     "documents[0].text"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True,
                   "add_generation_prompt": False}, 400, "continue_final_message"),  # the last message is the user's
    ("/tokenize", {"prompt": "hi", "chat_template_kwargs": {"x": 1}}, 400, "chat_template_kwargs"),
    # tools and media settings are checked by the chat endpoint's rules
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {
        "name": "bad name"}}]}, 400, "tools[0].function.name"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "tools": _TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, 400, "tool_choice.function.name"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "mm_processor_kwargs": {"nope": 1}}, 400, None),
    ("/tokenize", {"prompt": "hi", "tools": _TOOLS}, 400, "tools"),
    ("/tokenize", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 10**7]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {"model": "gpt-9", "tokens": [1]}, 404, "model"),
])
def test_bad_tokenize_requests_are_openai_shaped_errors(omni_dir, info, path, body, status, param):
    r, again, anon = _calls(omni_dir, info, ("POST", path, body, AUTH),
                            ("POST", "/tokenize", {"prompt": "still serving"}, AUTH), ("POST", path, body))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and (param is None or err["param"] == param), err
    assert again.status_code == 200 and anon.status_code == 401  # the key is required, as on /v1


def test_stage_down_is_503_with_retry_after_and_health_503(omni_dir, info):
    r, s, h, m = _calls(omni_dir, info,
                        ("POST", "/v1/chat/completions", _chat("hi", max_tokens=2), AUTH),
                        ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "stream": True}, AUTH),
                        ("GET", "/health"), ("GET", "/metrics"))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "service_unavailable"
    assert s.status_code == 503  # failures before the first token keep their status, even when streaming
    assert h.status_code == 503 and set(h.json()["stages"]) == {"ingest", "encoder", "generator"}
    m = m.text
    assert 'mmpipe_gateway_requests_total{endpoint="/v1/chat/completions",model="tiny",status="503"}' in m
    assert "mmpipe_gateway_time_to_first_token_seconds" in m


def test_unknown_route_is_openai_shaped_404(omni_dir, info):
    r = _call(omni_dir, info, "GET", "/v1/nope", None, AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_sse_framing_and_in_band_errors():
    async def events():
        yield sse.event({"a": 1})
        raise ServiceUnavailableError("generator went away")

    async def collect():
        return [e async for e in sse.with_error_events(events())]

    out = asyncio.run(collect())
    assert out[0] == 'data: {"a": 1}\n\n' and out[-1] == "data: [DONE]\n\n"
    err = json.loads(out[1].removeprefix("data: "))
    assert err["error"]["code"] == 503 and "went away" in err["error"]["message"]


def test_grpc_messages_become_the_same_domain_input():
    req = gateway_pb2.ChatRequest(model="tiny", messages=[gateway_pb2.ChatMessage(role="user", content=[
        gateway_pb2.ContentPart(uuid="u1", image_url=gateway_pb2.MediaUrl(url="")),
        gateway_pb2.ContentPart(video_url=gateway_pb2.MediaUrl(url="file:///m/v.mp4")),
        gateway_pb2.ContentPart(input_audio=gateway_pb2.InputAudio(data="AAAA", format="wav")),
        gateway_pb2.ContentPart(image_embeds=gateway_pb2.ImageEmbeds(data="E", image_grid_thw="G")),
        gateway_pb2.ContentPart(audio_embeds=gateway_pb2.AudioEmbeds(data="A")),
        gateway_pb2.ContentPart(text="hi")])],
        sampling=gateway_pb2.SamplingOptions(temperature=0, max_tokens=3, stop=["x"], logprobs=True),
        add_special_tokens=True)
    inp = chat_input_from_pb(req)
    assert inp.messages[0]["content"] == [
        {"type": "image_url", "uuid": "u1", "image_url": None},
        {"type": "video_url", "video_url": {"url": "file:///m/v.mp4"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "image_embeds", "image_embeds": {"image_embeds": "E", "image_grid_thw": "G"}},
        {"type": "audio_embeds", "audio_embeds": "A"},
        {"type": "text", "text": "hi"}]
    assert inp.add_special_tokens and not chat_input_from_pb(gateway_pb2.ChatRequest()).add_special_tokens
    sp = inp.sampling
    assert (sp.temperature, sp.max_tokens, sp.stop, sp.logprobs) == (0.0, 3, ["x"], 0)
    assert completion_input_from_pb(gateway_pb2.CompletionRequest(
        token_ids=gateway_pb2.TokenIds(ids=[1, 2]))).prompt_token_ids == [1, 2]
    assert not completion_input_from_pb(gateway_pb2.CompletionRequest(text="a", add_special_tokens=False)
                                        ).add_special_tokens
    # mmpipe.client builds the same parts from the HTTP API's dicts
    from mmpipe.client import _message

    assert _message({"role": "user", "content": [{"type": "audio_embeds", "audio_embeds": "A"}]}, 0) == \
        gateway_pb2.ChatMessage(role="user", content=[gateway_pb2.ContentPart(audio_embeds=gateway_pb2.AudioEmbeds(
            data="A"))])
    with pytest.raises(InvalidInputError):
        chat_input_from_pb(gateway_pb2.ChatRequest(messages=[gateway_pb2.ChatMessage(
            role="user", content=[gateway_pb2.ContentPart()])]))


def test_ready_needs_only_the_generator(omni_dir, info):
    """/ready (the load balancer's probe) is 200 "degraded" while ingest and encoder are down but the
    generator serves; /health still says 503 until everything is up."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    import grpc

    async def go():
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            down = [f"127.0.0.1:{free_port()}" for _ in range(2)]
            conf = GatewayConfig(model=omni_dir, served_model_names=("tiny",), api_key=KEY)
            app = build_app(GatewayCore(conf, info, StageClients(*down, f"127.0.0.1:{port}")))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
                await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
                before = await c.get("/ready")
                await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
                return before, await c.get("/ready"), await c.get("/health")
        finally:
            await server.stop(None)

    before, ready, full = asyncio.run(go())
    assert before.status_code == 503 and before.headers["retry-after"] == "1"
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    assert ready.json()["stages"]["generator"] == "SERVING" and ready.json()["stages"]["encoder"] == "UNAVAILABLE"
    assert full.status_code == 503


def test_grpc_tokenize_and_detokenize_match_http(omni_dir, info):
    """Gateway.Tokenize / Detokenize through a real gRPC server and mmpipe.client, beside POST /tokenize."""
    import grpc

    from mmpipe.client import MMPipeClient
    from mmpipe.services.common.pb import gateway_pb2_grpc
    from mmpipe.services.gateway.grpc_api.servicer import GatewayServicer
    from mmpipe.shared.errors import AuthenticationError, NotFoundError

    plain = [{"role": "user", "content": "Hello there"}]

    def with_client(target: str) -> dict:
        out = {}
        with MMPipeClient(target, api_key=KEY, timeout=30) as c:
            out["prompt"] = c.tokenize("The quick brown fox", return_token_strs=True)
            out["chat"] = c.tokenize(messages=plain)
            out["chat_nogen"] = c.tokenize(messages=plain, add_generation_prompt=False)
            out["text"] = c.detokenize(out["prompt"].tokens)
            for name, call in (("bad_ids", lambda: c.detokenize([10**7])),
                               ("bad_model", lambda: c.tokenize("hi", model="gpt-9"))):
                try:
                    call()
                except Exception as e:  # the client rebuilds the gateway's exception class
                    out[name] = e
        with MMPipeClient(target, timeout=30) as anon:
            try:
                anon.tokenize("hi")
            except Exception as e:
                out["anon"] = e
        return out

    async def go():
        app = _app(omni_dir, info)
        server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(app.state.core), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            got = await asyncio.to_thread(with_client, f"127.0.0.1:{port}")
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
                http = (await c.post("/tokenize", json={"messages": plain}, headers=AUTH)).json()
            return got, http
        finally:
            await server.stop(0)

    got, http = asyncio.run(go())
    want = info.tokenizer("The quick brown fox").input_ids
    assert got["prompt"].tokens == want and got["prompt"].count == len(want)
    assert got["prompt"].token_strs == info.tokenizer.convert_ids_to_tokens(want)
    assert got["prompt"].max_model_len == info.max_model_len
    assert got["chat"].tokens == http["tokens"] and got["chat"].count > got["chat_nogen"].count
    assert got["text"] == info.tokenizer.decode(want)
    assert isinstance(got["bad_ids"], InvalidInputError) and got["bad_ids"].param == "tokens"
    assert isinstance(got["bad_model"], NotFoundError) and isinstance(got["anon"], AuthenticationError)


@pytest.mark.parametrize("disabled", [False, True])
def test_fastapi_docs_on_by_default_and_disable_flag(omni_dir, info, disabled):
    async def go():
        app = _app(omni_dir, info, disable_fastapi_docs=disabled)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            return [await c.get(p) for p in ("/docs", "/redoc", "/openapi.json")]

    docs, redoc, spec = asyncio.run(go())
    if disabled:
        assert [r.status_code for r in (docs, redoc, spec)] == [404, 404, 404]
        assert spec.json()["error"]["code"] == 404
    else:
        assert docs.status_code == 200 and "/openapi.json" in docs.text and "swagger" in docs.text.lower()
        assert redoc.status_code == 200 and "redoc" in redoc.text.lower()
        assert "/v1/chat/completions" in spec.json()["paths"]


def test_disable_fastapi_docs_flag_reaches_the_config(omni_dir):
    import argparse

    from mmpipe.services.gateway.config import add_cli_args, config_from_args

    parse = add_cli_args(argparse.ArgumentParser()).parse_args
    assert config_from_args(parse(["--model", omni_dir])).disable_fastapi_docs is False
    assert config_from_args(parse(["--model", omni_dir, "--disable-fastapi-docs"])).disable_fastapi_docs is True
