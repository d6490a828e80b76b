"""The gateway as a forwarder: text deltas and stop strings come from the generator, SSE chunks are built without
pydantic but in pydantic's exact JSON, one UUID look-up per item, and `--api-server-count` workers on one port.

Real processes throughout: the three stages of tests/services_helpers.py on the tiny qwen2_vl model with a real
redis-server, `mmpipe gateway` processes in front of them, the official `openai` client, and the offline `LLM`
as the reference.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import numpy as np
import openai
import pytest
from media_craft import rgba_png_bomb
from services_helpers import scrape, start_gateway_process

from mmpipe.services.common.convert import MediaSource
from mmpipe.services.common.stage_clients import StageClients
from mmpipe.services.gateway.http.sse import ChunkEvents, usage
from mmpipe.services.gateway.openai.chat_completion.protocol import (
    ChatCompletionStreamChoice, ChatCompletionStreamResponse, ChoiceLogprobs, DeltaMessage, TokenLogprob,
)
from mmpipe.services.gateway.openai.completion.protocol import (CompletionChoice, CompletionLogprobs,
                                                                 CompletionResponse)
from mmpipe.services.gateway.openai.protocol import UsageInfo
from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.types import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog"


def png(seed: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (84, 112, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(b: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(b).decode()


@pytest.fixture(scope="module")
def gateway(stage_stack, qwen2_vl_dir, tmp_path_factory):
    addrs = {"ingest": stage_stack.ingest_addr, "encoder": stage_stack.encoder_addr,
             "generator": stage_stack.generator_addr}
    gw = start_gateway_process(qwen2_vl_dir, addrs, tmp_path_factory.mktemp("gw"), ["--shutdown-grace-s", "5"])
    try:
        gw.wait_healthy()
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def offline(qwen2_vl_dir):
    from mmpipe import LLM

    return LLM(qwen2_vl_dir, device="cpu")


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="none", max_retries=0, timeout=120)


# --- SSE chunks: built by hand, byte for byte what pydantic writes ------------------------------------------------
@pytest.mark.parametrize("text", ["", "plain", 'quo"te \\ back', "new\nline\ttab", "é ü 日本 \u2028 \x01"])
def test_chat_chunk_json_equals_pydantic(text):
    ev = ChunkEvents("chatcmpl-r1", "chat.completion.chunk", 1700000000, "tiny")
    want = ChatCompletionStreamResponse(id="chatcmpl-r1", created=1700000000, model="tiny", choices=[
        ChatCompletionStreamChoice(delta=DeltaMessage(content=text))])
    assert ev.event({"index": 0, "delta": {"content": text}}) == f"data: {want.model_dump_json(exclude_none=True)}\n\n"
    full = ChatCompletionStreamResponse(
        id="chatcmpl-r1", created=1700000000, model="tiny", usage=UsageInfo.of(7, 3),
        choices=[ChatCompletionStreamChoice(delta=DeltaMessage(content=text), finish_reason="stop", token_ids=[5, 6],
                                            logprobs=ChoiceLogprobs(content=[TokenLogprob(
                                                token=text, logprob=-0.25, bytes=list(text.encode()))]))])
    got = ev.event({"index": 0, "delta": {"content": text},
                    "logprobs": {"content": [{"token": text, "logprob": -0.25, "bytes": list(text.encode()),
                                              "top_logprobs": []}]},
                    "finish_reason": "stop", "token_ids": [5, 6]}, usage=usage(7, 3))
    assert got == f"data: {full.model_dump_json(exclude_none=True)}\n\n"
    first = ChatCompletionStreamResponse(id="chatcmpl-r1", created=1700000000, model="tiny", prompt_token_ids=[1, 2],
                                         choices=[ChatCompletionStreamChoice(delta=DeltaMessage(role="assistant",
                                                                                                content=""))])
    assert ev.event({"index": 0, "delta": {"role": "assistant", "content": ""}}, prompt_token_ids=[1, 2]) == \
        f"data: {first.model_dump_json(exclude_none=True)}\n\n"
    tail = ChatCompletionStreamResponse(id="chatcmpl-r1", created=1700000000, model="tiny", choices=[],
                                        usage=UsageInfo.of(7, 3))
    assert ev.event(None, usage=usage(7, 3)) == f"data: {tail.model_dump_json(exclude_none=True)}\n\n"


def test_completion_chunk_json_equals_pydantic():
    ev = ChunkEvents("cmpl-r2", "text_completion", 1700000001, "tiny")
    lp = CompletionLogprobs(tokens=["a", "é"], token_logprobs=[-0.5, -1.0], text_offset=[0, 1])
    want = CompletionResponse(id="cmpl-r2", created=1700000001, model="tiny", choices=[CompletionChoice(
        text="aé", logprobs=lp, finish_reason="length", token_ids=[3, 4], prompt_token_ids=[9])])
    got = ev.event({"index": 0, "text": "aé", "logprobs": {"tokens": ["a", "é"], "token_logprobs": [-0.5, -1.0],
                                                          "text_offset": [0, 1]},
                    "finish_reason": "length", "token_ids": [3, 4], "prompt_token_ids": [9]})
    assert got == f"data: {want.model_dump_json(exclude_none=True)}\n\n"


# --- text deltas and stop strings: the generator's, forwarded unchanged -------------------------------------------
def _sse_texts(gw, body: dict) -> tuple[list[str], list[int], str | None]:
    """POST a streaming completion; the text of every chunk, the streamed token ids, the finish reason."""
    texts, ids, reason = [], [], None
    with httpx.stream("POST", f"{gw.url}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            texts.append(choice["text"])
            ids += choice.get("token_ids") or []
            reason = choice.get("finish_reason") or reason
    return texts, ids, reason


def test_gateway_streams_exactly_the_generators_text_deltas(gateway, stage_stack, offline):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    texts, ids, reason = _sse_texts(gateway, body)
    prompt_ids = offline.tokenizer(PROMPT).input_ids

    async def direct() -> tuple[list[str], list[int]]:
        c = StageClients.connect(generator=stage_stack.generator_addr)
        try:
            out_t, out_ids = [], []
            async for ch in c.generator.generate(f"direct-{time.monotonic_ns()}", prompt_ids, [],
                                                 SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                                                 return_text=True):
                out_t.append(ch.text)
                out_ids += ch.token_ids
            return out_t, out_ids
        finally:
            await c.close()

    gen_texts, gen_ids = asyncio.run(direct())
    assert ids == gen_ids and reason == "length"
    # the gateway re-decodes nothing, it forwards each Generate message's text (where the messages split depends on
    # timing: outputs already waiting when the generator sends come as one message; test_generator_streaming.py)
    assert "".join(texts) == "".join(gen_texts) and len(texts) <= len(ids)
    ref = offline.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert "".join(texts) == ref[0].outputs[0].text


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_are_applied_once_by_the_generator(gateway, stage_stack, offline, include):
    from mmpipe import SamplingParams as SP

    free = offline.generate(PROMPT, SP(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    text = free.outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), f"no usable stop string in {text!r}"
    ref = offline.generate(PROMPT, SP(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop],
                                      include_stop_str_in_output=include), use_tqdm=False)[0].outputs[0]
    stops_before = stage_stack.metric("generator", "mmpipe_generator_finished_requests_total", reason="stop")
    texts, ids, reason = _sse_texts(gateway, {
        "model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0.0, "ignore_eos": True,
        "return_token_ids": True, "stop": [stop], "include_stop_str_in_output": include})
    assert reason == "stop" == ref.finish_reason
    assert "".join(texts) == ref.text and ids == ref.token_ids
    assert (stop in "".join(texts)) == include
    # the generator ended the request on the stop string itself (before, the gateway cut the stream too); it
    # counts the finish after its last message went out, so the count may trail the client by a moment
    def stops() -> float:
        return stage_stack.metric("generator", "mmpipe_generator_finished_requests_total", reason="stop")

    deadline = time.monotonic() + 5
    while stops() < stops_before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stops() == stops_before + 1
    # non-streaming: the same text through the official client
    r = client(gateway).completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0.0, stop=[stop],
                                           extra_body={"ignore_eos": True, "include_stop_str_in_output": include})
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "stop"


# --- one look-up per UUID ------------------------------------------------------------------------------------------
def test_a_uuid_is_looked_up_once(gateway, stage_stack):
    lookups = lambda: stage_stack.metric("encoder", "mmpipe_encoder_cache_lookups_total")  # noqa: E731
    ingest_lookups = lambda: stage_stack.metric("ingest", "mmpipe_ingest_cache_lookups_total")  # noqa: E731
    c = client(gateway)
    part = {"type": "image_url", "image_url": {"url": data_url(png(41))}, "uuid": "stream-test-41"}
    msgs = [{"role": "user", "content": [part, {"type": "text", "text": "Describe it."}]}]
    before, ing_before = lookups(), ingest_lookups()
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, temperature=0.0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    # a miss with its media: the gateway's one Lookup; ingest encodes under the key it named, asking nothing
    assert lookups() == before + 1 and ingest_lookups() == ing_before
    only = [{"role": "user", "content": [{"type": "image_url", "image_url": None, "uuid": "stream-test-41"},
                                         {"type": "text", "text": "Describe it."}]}]
    r2 = c.chat.completions.create(model="tiny", messages=only, max_tokens=2, temperature=0.0,
                                   extra_body={"ignore_eos": True})
    assert r2.choices[0].finish_reason == "length" and lookups() == before + 2


def test_ingest_refuses_a_key_without_uuid_or_source(stage_stack):
    async def go(item: MediaSource) -> None:
        c = StageClients.connect(ingest=stage_stack.ingest_addr)
        try:
            await c.ingest.ingest([item], request_id="key-check")
        finally:
            await c.close()

    for item in (MediaSource("image", data=png(42), key="mmpipe:v1:x"),
                 MediaSource("image", uuid="u-42", key="mmpipe:v1:x")):
        with pytest.raises(InvalidInputError, match="key"):
            asyncio.run(go(item))


def test_media_over_the_decode_budget_is_an_openai_400_naming_the_limit(gateway):
    """A 330 KB PNG of 9000x9000 RGBA pixels (issue 16): refused from its header by ingest, an OpenAI-shaped 400
    through the official client; the next request is served."""
    c = client(gateway)
    bomb = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(rgba_png_bomb())}}, {"type": "text", "text": "Hi"}]}]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=bomb, max_tokens=2)
    assert e.value.status_code == 400
    err = e.value.body if isinstance(e.value.body, dict) else {}
    assert "max-image-decode-pixels" in e.value.message and "9000x9000" in e.value.message, err
    ok = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png(77))}},
                                       {"type": "text", "text": "Hi"}]}]
    assert c.chat.completions.create(model="tiny", messages=ok, max_tokens=2, temperature=0.0).choices[0].message


# --- --api-server-count: two gateway processes, one port ------------------------------------------------------------
def test_two_api_servers_share_one_port_and_one_metrics_view(stage_stack, qwen2_vl_dir, tmp_path):
    addrs = {"ingest": stage_stack.ingest_addr, "encoder": stage_stack.encoder_addr,
             "generator": stage_stack.generator_addr}
    gw = start_gateway_process(qwen2_vl_dir, addrs, tmp_path, ["--api-server-count", "2", "--shutdown-grace-s", "5"])
    try:
        gw.wait_healthy()
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
        seen: dict[str, int] = {}
        sent = 0
        t0 = time.monotonic()
        while len(seen) < 2 and sent < 60:
            with httpx.Client(timeout=60) as h:  # a new connection each time: the kernel picks a worker per connection
                r = h.post(f"{gw.url}/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] == "length"
            w = r.headers["x-mmpipe-gateway-worker"]
            seen[w] = seen.get(w, 0) + 1
            sent += 1
        assert set(seen) == {"0", "1"}, seen
        # the openai client (its own connection pool) is served as well
        assert client(gw).completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0.0,
                                             extra_body={"ignore_eos": True}).choices[0].finish_reason == "length"
        sent += 1
        # whichever worker answers the scrape, it reports both workers' counts and both workers' CPU
        for _ in range(4):
            with httpx.Client(timeout=10) as h:
                text = h.get(f"{gw.url}/metrics").text
            assert 'process_cpu_seconds_total{worker="0"}' in text and 'process_cpu_seconds_total{worker="1"}' in text
            m = scrape(f"{gw.url}/metrics", "mmpipe_gateway_requests_total", endpoint="/v1/completions",
                       status="200")
            assert m == sent
        cpu = scrape(f"{gw.url}/metrics", "process_cpu_seconds_total")
        print(f"two workers, {sent} requests in {time.monotonic() - t0:.1f} s, worker split {seen}; gateway CPU "
              f"{cpu:.2f} s in all (start-up included)")
    finally:
        gw.stop()
    assert gw.proc.returncode == 0, gw.log.read_text()[-2000:]


def test_the_shared_http_socket_streams_without_nagle():
    """`--api-server-count N` serves on a socket the parent binds. It was made with proto 0, and asyncio sets
    TCP_NODELAY only on IPPROTO_TCP sockets, so every accepted connection ran under Nagle: the SSE chunk of the
    first token (a second small write) waited for the client's delayed ACK, about 40 ms on every request
    (client TTFT 60 ms against the gateway's own 13 ms on the CPU box; BENCHMARKS.md). Accepted connections
    must have TCP_NODELAY set, as uvicorn's own sockets do."""
    import socket

    from mmpipe.services.gateway.workers import bind_http_socket

    sock = bind_http_socket("127.0.0.1", 0)

    async def main() -> int:
        got: asyncio.Future = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            got.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        _, w = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(got, 10)
        finally:
            w.close()
            server.close()

    assert asyncio.run(main()) != 0
