"""Property-based fuzzing (hypothesis) of the request parsers, the media layer and the cache serde, and
schemathesis against the gateway's OpenAPI document served by the real FastAPI app in-process.

The rule everywhere: hostile input may only surface as an mmpipe error (a 4xx, or 503 when a stage is down)
in the OpenAI error shape, never as a foreign exception, a 500 or a wrong tensor.
Budgets: the default profile keeps each test to a few seconds; HYPOTHESIS_PROFILE=ci-long (make test-slow)
runs many more examples. Found crashes are pinned in test_hardening_regressions.py.
"""
from __future__ import annotations

import asyncio
import base64
import io
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mmpipe.shared.errors import MMPipeError

_PROFILES = {
    "default": dict(max_examples=40, deadline=None),
    "ci-long": dict(max_examples=1500, deadline=None),
}
_P = _PROFILES.get(os.environ.get("HYPOTHESIS_PROFILE", "default"), _PROFILES["default"])
# database=None: no .hypothesis folder in the repo; derandomize in the fast profile keeps CI reproducible.
FUZZ = settings(max_examples=_P["max_examples"], deadline=_P["deadline"], database=None,
                derandomize=os.environ.get("HYPOTHESIS_PROFILE") != "ci-long",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
SMALL = settings(FUZZ, max_examples=max(10, _P["max_examples"] // 3))

# ------------------------------------------------------------------------------------- JSON strategies

_KEYS = st.sampled_from(["type", "text", "image_url", "video_url", "audio_url", "input_audio", "image_embeds",
                         "image_pil", "url", "uuid", "data", "format", "role", "content", "name", "x"])
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=20), st.sampled_from(["user", "system", "assistant", "text", "image_url",
                                                            "input_audio", "wav", "data:,x", "http://127.0.0.1:9/"]))
JSON = st.recursive(_SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(_KEYS | st.text(max_size=5), kids, max_size=5)),
                    max_leaves=25)


@FUZZ
@given(JSON)
def test_parse_messages_only_raises_invalid_input(messages):
    from mmpipe.shared.chat.messages import parse_messages

    try:
        parsed = parse_messages(messages)
    except MMPipeError as e:
        assert 400 <= e.http_status < 500
        return
    assert len(parsed.conversation) == len(messages)


@FUZZ
@given(st.one_of(st.none(), st.dictionaries(st.sampled_from(["image", "video", "audio", "image_embeds", "smell"]),
                                            JSON, max_size=3)),
       st.one_of(st.none(), JSON), st.booleans(), st.booleans())
def test_parse_items_only_raises_mmpipe_errors(mm_data, mm_uuids, embeds, cache):
    from mmpipe.shared.inputs.parse import ParseOptions, parse_items

    opts = ParseOptions(modalities=("image", "video", "audio"), limit_mm_per_prompt={"image": 2},
                        enable_mm_embeds=embeds, cache_enabled=cache)
    try:
        parse_items(mm_data, mm_uuids, opts)
    except MMPipeError as e:
        assert 400 <= e.http_status < 500


@FUZZ
@given(st.dictionaries(st.sampled_from(["model", "messages", "max_tokens", "temperature", "top_p", "n", "stop",
                                        "stream", "seed", "logprobs", "top_logprobs", "prompt", "chat_template",
                                        "max_completion_tokens", "stream_options", "presence_penalty",
                                        "frequency_penalty", "repetition_penalty", "min_p", "logit_bias",
                                        "bad_words", "x"]), JSON, max_size=8))
def test_gateway_request_models_only_raise_validation_errors(body):
    from pydantic import ValidationError

    from mmpipe.services.gateway.openai.chat_completion.protocol import ChatCompletionRequest
    from mmpipe.services.gateway.openai.completion.protocol import CompletionRequest

    for model in (ChatCompletionRequest, CompletionRequest):
        try:
            req = model.model_validate(body)
        except ValidationError:
            continue
        try:
            req.to_sampling()  # the domain conversion may refuse, but only with a 4xx
        except MMPipeError as e:
            assert 400 <= e.http_status < 500


# ------------------------------------------------------------------------------------------ media layer

def _sample(kind: str) -> bytes:
    from PIL import Image

    if kind == "png":
        b = io.BytesIO()
        Image.new("RGB", (8, 6), (1, 2, 3)).save(b, "PNG")
        return b.getvalue()
    if kind == "wav":
        import soundfile as sf

        b = io.BytesIO()
        sf.write(b, np.zeros(400, np.float32), 8000, format="WAV")
        return b.getvalue()
    raise AssertionError(kind)


def _mutated(seed: bytes):
    return st.tuples(st.integers(0, len(seed)), st.binary(max_size=32), st.integers(0, 64)).map(
        lambda t: seed[:t[0]] + t[1] + seed[t[0] + t[2]:])


@FUZZ
@given(st.one_of(st.binary(max_size=512), _mutated(_sample("png"))))
def test_decode_image_random_bytes(data):
    from mmpipe.shared.media.image import decode_image

    try:
        img = decode_image(data, max_pixels=1_000_000)
    except MMPipeError as e:
        assert 400 <= e.http_status < 500
        return
    assert img.mode == "RGB"


@FUZZ
@given(st.one_of(st.binary(max_size=512), _mutated(_sample("wav"))))
def test_decode_audio_random_bytes(data):
    from mmpipe.shared.media.audio import decode_audio

    try:
        wav, sr = decode_audio(data, max_seconds=5)
    except MMPipeError as e:
        assert 400 <= e.http_status < 500
        return
    assert wav.dtype == np.float32 and sr > 0 and wav.shape[0] <= 5 * sr + 1


@SMALL
@given(st.binary(max_size=1024))
def test_decode_video_random_bytes(data):
    from mmpipe.shared.media.policy import MediaPolicy
    from mmpipe.shared.media.video import decode_video

    try:
        decode_video(data, None, MediaPolicy())
    except MMPipeError as e:
        assert 400 <= e.http_status < 500


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())))
def test_decode_tensor_b64_random(s):
    from mmpipe.shared.media.embeds import decode_tensor_b64

    try:
        t = decode_tensor_b64(s, param="image_embeds", max_bytes=1 << 20)
    except MMPipeError as e:
        assert e.http_status == 400 and e.param == "image_embeds"
        return
    import torch
    assert bool(torch.isfinite(t).all())


def _torch_payload() -> bytes:
    import torch

    b = io.BytesIO()
    torch.save(torch.arange(12, dtype=torch.float32).reshape(3, 4), b)
    return b.getvalue()


@FUZZ
@given(_mutated(_torch_payload()))
def test_decode_tensor_b64_mutated_archives(raw):
    from mmpipe.shared.media.embeds import decode_tensor_b64

    try:
        decode_tensor_b64(base64.b64encode(raw).decode(), param="image_embeds", max_bytes=1 << 20)
    except MMPipeError as e:
        assert e.http_status == 400


@FUZZ
@given(st.text(max_size=300), st.sampled_from(["data:", "data:image/png;base64,", "data:;base64,", "data:,"]))
def test_fetch_data_urls_random(payload, prefix):
    from mmpipe.shared.media.fetch import fetch_bytes
    from mmpipe.shared.media.policy import MediaPolicy

    try:
        out = fetch_bytes(prefix + payload, MediaPolicy(max_bytes=4096))
    except MMPipeError as e:
        assert 400 <= e.http_status < 500
        return
    assert isinstance(out, bytes) and len(out) <= 4096


@FUZZ
@given(st.text(max_size=60))
def test_fetch_random_urls_never_leave_the_policy(tail):
    """Random http URLs under the strict policy: refused (4xx) or, for a public name, resolved by the fake
    resolver to 127.0.0.1 and then refused too. Nothing is ever dialled."""
    from mmpipe.shared.media import netguard
    from mmpipe.shared.media.fetch import fetch_bytes
    from mmpipe.shared.media.policy import MediaPolicy

    dialled = []
    with netguard.override_network(resolve=lambda h, p: ["127.0.0.1"],
                                   route=lambda ip, p: dialled.append(ip) or ("127.0.0.1", 9)):
        for url in (f"http://{tail}", f"https://x.test/{tail}", tail):
            try:
                fetch_bytes(url, MediaPolicy(allow_private_networks=False, fetch_timeout_s=1.0))
            except MMPipeError as e:
                assert 400 <= e.http_status < 500 or e.http_status == 504
    assert dialled == []


# ------------------------------------------------------------------------------------------------ serde

def _packed():
    import torch

    from mmpipe.shared.cache.serde import pack_embedding, pack_tensors
    from mmpipe.shared.types import MMEmbedding

    emb = MMEmbedding(modality="image", tensor=torch.arange(24, dtype=torch.float32).reshape(4, 6),
                      meta={"grid_thw": [1, 2, 2]})
    tens = {"pixel_values": torch.ones(2, 3), "grid": torch.tensor([[1, 2, 3]])}
    return emb, pack_embedding(emb), tens, pack_tensors(tens, {"k": 1})


_EMB, _EMB_B, _TENS, _TENS_B = _packed()


def _mutations(buf: bytes):
    flips = st.lists(st.tuples(st.integers(0, len(buf) - 1), st.integers(1, 255)), min_size=1, max_size=4).map(
        lambda fl: _apply_flips(buf, fl))
    return st.one_of(flips, _mutated(buf), st.integers(0, len(buf) - 1).map(lambda n: buf[:n]),
                     st.binary(min_size=1, max_size=64).map(lambda b: buf + b))


def _apply_flips(buf: bytes, flips) -> bytes:
    b = bytearray(buf)
    for pos, x in flips:
        b[pos] ^= x
    return bytes(b)


@FUZZ
@given(_mutations(_EMB_B))
def test_unpack_embedding_never_returns_a_wrong_tensor(buf):
    import torch

    from mmpipe.shared.cache.serde import CacheCorruptError, unpack_embedding

    assume(buf != _EMB_B)
    try:
        got = unpack_embedding(buf)
    except CacheCorruptError:
        return
    # only a change that leaves the meaning intact could pass (it cannot, but then it must be exact)
    assert got.modality == _EMB.modality and got.meta == _EMB.meta and torch.equal(got.tensor, _EMB.tensor)


@FUZZ
@given(_mutations(_TENS_B))
def test_unpack_tensors_never_returns_wrong_tensors(buf):
    import torch

    from mmpipe.shared.cache.serde import CacheCorruptError, unpack_tensors

    assume(buf != _TENS_B)
    try:
        got, meta = unpack_tensors(buf)
    except CacheCorruptError:
        return
    assert meta == {"k": 1} and set(got) == set(_TENS) and all(torch.equal(got[k], _TENS[k]) for k in got)


# ------------------------------------------------------------------------------------------- schemathesis

@pytest.fixture(scope="module")
def gateway_app():
    """The real FastAPI app over a real GatewayCore whose stage addresses have nothing listening (every stage
    call is UNAVAILABLE), on one event loop that lives for the module."""
    from mmpipe.services.gateway.config import GatewayConfig
    from mmpipe.services.gateway.core import GatewayCore
    from mmpipe.services.gateway.http.app import build_app
    from mmpipe.services.gateway.model_info import load_model_info
    from mmpipe.services.gateway.stages import StageClients
    from mmpipe.shared.cache.embedded_redis import free_port
    from mmpipe.shared.models.tiny import ensure_tiny_model

    model = str(ensure_tiny_model("qwen2_5_omni"))
    info = load_model_info(model)
    loop = asyncio.new_event_loop()

    async def make():
        down = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        cfg = GatewayConfig(model=model, served_model_names=("tiny",), api_key="sk-fuzz",
                            limit_mm_per_prompt={"image": 1}, request_timeout_s=5.0)
        return build_app(GatewayCore(cfg, info, StageClients(*down)))

    app = loop.run_until_complete(make())
    yield app, loop
    loop.close()


def _check_response(r) -> None:
    assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
        assert body["error"]["code"] == r.status_code
        if r.status_code == 503:
            assert "retry-after" in {k.lower() for k in r.headers}


def _operations():
    import schemathesis
    from fastapi import FastAPI

    from mmpipe.services.gateway.openai.chat_completion.api_router import router as chat
    from mmpipe.services.gateway.openai.completion.api_router import router as completion

    # The gateway serves no /openapi.json (openapi_url=None); the document FastAPI builds from its routes is
    # the contract schemathesis generates requests from.
    doc = FastAPI(title="mmpipe gateway")
    doc.include_router(chat)
    doc.include_router(completion)
    schema = schemathesis.openapi.from_dict(doc.openapi())
    return schema["/v1/chat/completions"]["POST"], schema["/v1/completions"]["POST"]


_CHAT_OP, _COMPLETION_OP = _operations()


def _send(app_loop, case, auth=True):
    import httpx

    app, loop = app_loop
    headers = {k: v for k, v in (case.headers or {}).items() if isinstance(v, str)}
    if auth:
        headers["Authorization"] = "Bearer sk-fuzz"

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://gw", timeout=10) as c:
            return await c.request(case.method, case.formatted_path, json=case.body, headers=headers,
                                   params=case.query)

    return loop.run_until_complete(go())


@SMALL
@given(case=_CHAT_OP.as_strategy())
def test_schemathesis_chat_completions(gateway_app, case):
    _check_response(_send(gateway_app, case))


@SMALL
@given(case=_COMPLETION_OP.as_strategy())
def test_schemathesis_completions(gateway_app, case):
    _check_response(_send(gateway_app, case))


@settings(SMALL, max_examples=10)
@given(case=_CHAT_OP.as_strategy())
def test_schemathesis_without_key_is_401(gateway_app, case):
    r = _send(gateway_app, case, auth=False)
    _check_response(r)
    assert r.status_code in (400, 401)
