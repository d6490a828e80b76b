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
    r1, r2, r3 = _calls(omni_dir, info,
                        ("POST", "/v1/completions", {"model": "tiny", "prompt": "see <|IMAGE|>"}, AUTH),
                        ("POST", "/v1/completions", {"model": "tiny", "prompt": [1, 2, 10**6]}, AUTH),
                        ("POST", "/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, AUTH))
    assert r1.status_code == 400 and "placeholder" in r1.json()["error"]["message"]
    assert r2.status_code == 400 and "token ids" in r2.json()["error"]["message"]
    assert r3.status_code == 400 and "one prompt" in r3.json()["error"]["message"]


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
        gateway_pb2.ContentPart(text="hi")])],
        sampling=gateway_pb2.SamplingOptions(temperature=0, max_tokens=3, stop=["x"], logprobs=True))
    inp = chat_input_from_pb(req)
    assert inp.messages[0]["content"] == [
        {"type": "image_url", "uuid": "u1", "image_url": None},
        {"type": "video_url", "video_url": {"url": "file:///m/v.mp4"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "image_embeds", "image_embeds": {"image_embeds": "E", "image_grid_thw": "G"}},
        {"type": "text", "text": "hi"}]
    sp = inp.sampling
    assert (sp.temperature, sp.max_tokens, sp.stop, sp.logprobs) == (0.0, 3, ["x"], 0)
    assert completion_input_from_pb(gateway_pb2.CompletionRequest(
        token_ids=gateway_pb2.TokenIds(ids=[1, 2]))).prompt_token_ids == [1, 2]
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
