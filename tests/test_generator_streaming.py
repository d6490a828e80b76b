"""Fewer Generate messages per request, the same output: the engine streams coalesce what is already waiting for
a consumer that fell behind (shared/engine/streams.py), and `--stream-interval N` sends N tokens a message
(services/generator/stream_interval.py, vLLM's flag), with the same tokens, text, logprobs, stop strings,
finish reasons and cancellation.

Unit tests of the two rules first, then real processes: the stage stack of tests/services_helpers.py (its
generator at the default interval 1), a second generator with `--stream-interval 4` on the same Redis, a gateway
in front of each, the official `openai` client, and the offline `LLM` as the reference.
"""
from __future__ import annotations

import asyncio
import json
import math
import time

import grpc
import httpx
import openai
import pytest
from services_helpers import scrape, start_gateway_process, start_stage_process, stop_together

from mmpipe.services.common.convert import TokenChunk
from mmpipe.services.common.stage_clients import GeneratorClient, StageClients
from mmpipe.services.generator.stream_interval import StreamInterval
from mmpipe.shared.engine.outputs import StepOutput
from mmpipe.shared.engine.streams import StreamTable
from mmpipe.shared.types import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog"
N = 4


# --- the two rules, alone -------------------------------------------------------------------------------------------
def _out(i: int, last: int, rid: str = "r") -> StepOutput:
    return StepOutput(rid, [i], [-i / 10], i == last, "length" if i == last else None, 5)


def test_streams_coalesce_only_what_is_waiting():
    async def main():
        table = StreamTable()
        left: list[str] = []
        stream = table.open("r")
        outs = table.iterate(stream, left.append)
        table.deliver_step([_out(0, 9)])
        assert (await outs.__anext__()).new_token_ids == [0]  # nothing waiting behind it: alone, at once
        for i in range(1, 6):  # five steps come while the consumer is busy
            table.deliver_step([_out(i, 9)])
        await asyncio.sleep(0)
        got = await outs.__anext__()
        assert got.new_token_ids == [1, 2, 3, 4, 5] and got.logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5])
        assert not got.finished
        for i in range(6, 10):
            table.deliver_step([_out(i, 9)])
        await asyncio.sleep(0)
        rest = [o async for o in outs]
        assert len(rest) == 1 and rest[0].new_token_ids == [6, 7, 8, 9] and rest[0].finished
        assert rest[0].finish_reason == "length" and left == [] and "r" not in table

        # an error queued behind outputs: the outputs first, then the error
        stream = table.open("e")
        outs = table.iterate(stream, left.append)
        table.deliver_step([_out(0, 9, "e")])
        table.deliver_step([_out(1, 9, "e")])
        table.deliver("e", RuntimeError("engine died"))
        await asyncio.sleep(0)
        assert (await outs.__anext__()).new_token_ids == [0, 1]
        with pytest.raises(RuntimeError, match="engine died"):
            await outs.__anext__()
        assert left == [] and "e" not in table

    asyncio.run(main())


def _chunk(i: int, last: int, lps: bool = True) -> TokenChunk:
    return TokenChunk([i], [-float(i)] if lps else None, f"<{i}>", i == last, "stop" if i == last else None, 7)


def test_stream_interval_sends_first_every_n_and_last():
    si = StreamInterval(N)
    sent = [m for i in range(11) if (m := si.push(_chunk(i, 10))) is not None]
    assert [m.token_ids for m in sent] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert [m.text for m in sent] == ["<0>", "<1><2><3><4>", "<5><6><7><8>", "<9><10>"]
    assert sent[1].logprobs == [-1.0, -2.0, -3.0, -4.0]
    assert [m.finished for m in sent] == [False, False, False, True] and sent[-1].finish_reason == "stop"
    # a chunk that is already N tokens or more (coalesced upstream) goes out at once
    si = StreamInterval(N)
    big = TokenChunk(list(range(1, 7)), None, "x", False, None, 7)
    assert si.push(_chunk(0, 99, lps=False)) is not None and si.push(big) is big
    assert si.push(_chunk(7, 99, lps=False)) is None and si.push(_chunk(8, 8, lps=False)).token_ids == [7, 8]
    one = StreamInterval(1)
    c = _chunk(3, 9)
    assert one.push(c) is c
    with pytest.raises(ValueError):
        StreamInterval(0)


# --- real processes ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen4(stage_stack, qwen2_vl_dir):
    proc = start_stage_process("generator", qwen2_vl_dir, stage_stack.redis_url, extra=["--stream-interval", str(N)],
                               log_dir=stage_stack.log_dir)
    yield proc
    proc.stop()


def _gateway(stage_stack, qwen2_vl_dir, tmp_path_factory, generator_addr: str):
    addrs = {"ingest": stage_stack.ingest_addr, "encoder": stage_stack.encoder_addr, "generator": generator_addr}
    return start_gateway_process(qwen2_vl_dir, addrs, tmp_path_factory.mktemp("gw"), ["--shutdown-grace-s", "5"])


@pytest.fixture(scope="module")
def gateways(stage_stack, gen4, qwen2_vl_dir, tmp_path_factory):
    """{1: a gateway in front of the stack's generator, N: one in front of the --stream-interval N generator},
    started at once"""
    gws = {}
    try:
        gws[1] = _gateway(stage_stack, qwen2_vl_dir, tmp_path_factory, stage_stack.generator_addr)
        gws[N] = _gateway(stage_stack, qwen2_vl_dir, tmp_path_factory, gen4.addr)
        for gw in gws.values():
            gw.wait_healthy()
        yield gws
    finally:
        stop_together(*gws.values())


@pytest.fixture(scope="module")
def offline(qwen2_vl_dir):
    from mmpipe import LLM

    return LLM(qwen2_vl_dir, device="cpu")


def _direct(addr: str, ids: list[int], sp: SamplingParams, options: list | None = None,
            pause_after_first_s: float = 0.0) -> list[TokenChunk]:
    """Every Generate message of one request, read straight from the generator's gRPC port."""
    async def go() -> list[TokenChunk]:
        c = GeneratorClient(grpc.aio.insecure_channel(addr, options=options or []), timeout_s=120)
        try:
            msgs = []
            async for ch in c.generate(f"direct-{time.monotonic_ns()}", ids, [], sp, return_text=True):
                msgs.append(ch)
                if len(msgs) == 1 and pause_after_first_s:
                    await asyncio.sleep(pause_after_first_s)  # the engine keeps stepping meanwhile
            return msgs
        finally:
            await c.close()

    return asyncio.run(go())


def _joined(msgs: list[TokenChunk]) -> tuple[list[int], list[float], str]:
    return ([t for m in msgs for t in m.token_ids], [x for m in msgs for x in (m.logprobs or [])],
            "".join(m.text for m in msgs))


def test_stream_interval_same_tokens_text_and_logprobs_fewer_messages(stage_stack, gen4, offline):
    ids = offline.tokenizer(PROMPT).input_ids
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    one, four = _direct(stage_stack.generator_addr, ids, sp), _direct(gen4.addr, ids, sp)
    ref = offline.generate(PROMPT, sp, use_tqdm=False)[0].outputs[0]
    for msgs in (one, four):
        got_ids, got_lps, text = _joined(msgs)
        assert got_ids == ref.token_ids and text == ref.text
        assert got_lps == pytest.approx(ref.logprobs, abs=1e-4)
        assert msgs[-1].finished and msgs[-1].finish_reason == "length"
        assert not any(m.finished for m in msgs[:-1])
    # interval N: the first token alone, then at least N a message, the last at once
    assert len(four[0].token_ids) >= 1 and all(len(m.token_ids) >= N for m in four[1:-1])
    assert len(four) <= 1 + math.ceil((sp.max_tokens - 1) / N) < len(one)


def _sse(gw, body: dict) -> tuple[list[str], list[int], list[str], str | None]:
    """A streamed chat completion: each chunk's content, the token ids, the logprob tokens, the finish reason."""
    texts, ids, lp_tokens, reason = [], [], [], None
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:])["choices"]
            if not choices:
                continue
            ch = choices[0]
            if ch["delta"].get("content"):
                texts.append(ch["delta"]["content"])
            ids += ch.get("token_ids") or []
            lp_tokens += [e["token"] for e in (ch.get("logprobs") or {}).get("content") or []]
            reason = ch.get("finish_reason") or reason
    return texts, ids, lp_tokens, reason


def test_the_client_sees_the_same_stream_in_fewer_chunks(gateways):
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 32,
            "temperature": 0.0, "ignore_eos": True, "return_token_ids": True, "logprobs": True}
    t1, ids1, lp1, r1 = _sse(gateways[1], body)
    tn, idsn, lpn, rn = _sse(gateways[N], body)
    assert "".join(t1) == "".join(tn) and ids1 == idsn and lp1 == lpn and len(ids1) == 32
    assert r1 == rn == "length"
    assert len(tn) < len(t1)
    # and the same through the official client, not streamed
    c = openai.OpenAI(base_url=f"{gateways[N].url}/v1", api_key="none", max_retries=0, timeout=120)
    r = c.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=32, temperature=0.0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == "".join(t1) and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_with_stream_interval(gateways, gen4, offline, include):
    free = offline.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]
    assert stop.strip(), f"no usable stop string in {free!r}"
    ref = offline.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop],
                                                  include_stop_str_in_output=include), use_tqdm=False)[0].outputs[0]
    metrics = f"http://127.0.0.1:{gen4.metrics_port}/metrics"
    stops = scrape(metrics, "mmpipe_generator_finished_requests_total", reason="stop")
    texts, ids = [], []
    reason = None
    with httpx.stream("POST", f"{gateways[N].url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, "stop": [stop], "include_stop_str_in_output": include}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ch = json.loads(line[6:])["choices"][0]
                texts.append(ch["text"])
                ids += ch.get("token_ids") or []
                reason = ch.get("finish_reason") or reason
    assert reason == "stop" == ref.finish_reason
    assert "".join(texts) == ref.text and ids == ref.token_ids and (stop in "".join(texts)) == include
    # the stop string ended the request in the generator, held tokens or not (counted as its stream closes, just
    # after the last message went out)
    deadline = time.monotonic() + 5
    while scrape(metrics, "mmpipe_generator_finished_requests_total", reason="stop") < stops + 1 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scrape(metrics, "mmpipe_generator_finished_requests_total", reason="stop") == stops + 1


def test_cancel_with_stream_interval_aborts_the_request(gen4, offline):
    metrics = f"http://127.0.0.1:{gen4.metrics_port}/metrics"
    aborts = scrape(metrics, "mmpipe_generator_finished_requests_total", reason="abort")
    ids = offline.tokenizer("Tell me a very long story.").input_ids

    async def go() -> int:
        c = StageClients.connect(generator=gen4.addr)
        try:
            n = 0
            async for ch in c.generator.generate("long-n", ids, [], SamplingParams(max_tokens=1500, ignore_eos=True)):
                n += len(ch.token_ids)
                if n >= 2 * N:
                    break  # closing the iterator cancels the RPC
            return n
        finally:
            await c.close()

    assert asyncio.run(go()) >= 2 * N
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (scrape(metrics, "mmpipe_generator_engine_running_requests")
                                           or scrape(metrics, "mmpipe_generator_running_requests")):
        time.sleep(0.1)
    assert scrape(metrics, "mmpipe_generator_engine_running_requests") == 0
    assert scrape(metrics, "mmpipe_generator_running_requests") == 0
    assert scrape(metrics, "mmpipe_generator_finished_requests_total", reason="abort") == aborts + 1


def test_a_slow_reader_gets_what_waited_in_one_message(stage_stack, offline):
    """A gRPC client that reads slowly, with a small HTTP/2 window, so that the generator's writes wait for it:
    the tokens the engine made meanwhile come coalesced, all of them, in order (interval 1: no --stream-interval
    involved)."""
    ids = offline.tokenizer(PROMPT).input_ids
    sp = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    small_window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 64)]
    slow = _direct(stage_stack.generator_addr, ids, sp, small_window, pause_after_first_s=2.0)
    ref = offline.generate(PROMPT, sp, use_tqdm=False)[0].outputs[0]
    got_ids, _, text = _joined(slow)
    assert got_ids == ref.token_ids and text == ref.text
    assert slow[-1].finished and slow[-1].finish_reason == "length"
    sizes = [len(m.token_ids) for m in slow]
    assert max(sizes) > 1 and len(slow) < sp.max_tokens, sizes
