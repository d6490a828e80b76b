"""The stage services (ingest, encoder, generator) as real processes on free ports, with a real Redis.

Token ids through ingest -> encoder -> generator must equal the offline `LLM` on the same tiny model and input.
"""
from __future__ import annotations

import asyncio
import io
import time

import grpc
import numpy as np
import pytest
from media_craft import RSS_BOUND, hwm, long_720p_mp4, rgba_png_bomb
from services_helpers import start_stage_process, wait_healthy

from mmpipe.services.common.convert import LookupItem, MediaSource
from mmpipe.services.common.stage_clients import StageClients
from mmpipe.shared.errors import (InvalidInputError, MediaPolicyError, MMPipeError, NotCachedError,
                                  NotFoundError, ServiceUnavailableError)
from mmpipe.shared.media.decode_pool import TEST_FAULTS_ENV
from mmpipe.shared.types import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def image_png(seed: int, w: int = 112, h: int = 84) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def run(coro):
    return asyncio.run(coro)


async def _pipeline(stack, modality: str, data: bytes, prompt_ids: list[int], sp: SamplingParams,
                    uuid: str | None = None) -> tuple[list[int], list]:
    c = StageClients.connect(ingest=stack.ingest_addr, encoder=stack.encoder_addr, generator=stack.generator_addr)
    try:
        refs = await c.ingest.ingest([MediaSource(modality, data=data, uuid=uuid)], request_id="t-ingest")
        out: list[int] = []
        async for ch in c.generator.generate(f"t-{time.monotonic_ns()}", prompt_ids, refs, sp):
            out += ch.token_ids
        return out, refs
    finally:
        await c.close()


@pytest.fixture(scope="module")
def offline_vl(qwen2_vl_dir):
    from mmpipe import LLM

    return LLM(qwen2_vl_dir, device="cpu")


# --- stubs ----------------------------------------------------------------------------------------------------
def test_generated_stubs_are_fresh(tmp_path):
    from mmpipe.services.common import protogen

    protogen.generate(tmp_path)
    assert protogen.diff(protogen.PB_DIR, tmp_path) == [], "stale stubs: run `make proto`"


# --- health, reflection ---------------------------------------------------------------------------------------
def test_health_and_reflection(stage_stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for name, svc in (("ingest", "mmpipe.v1.Ingest"), ("encoder", "mmpipe.v1.Encoder"),
                      ("generator", "mmpipe.v1.Generator")):
        with grpc.insecure_channel(stage_stack.procs[name].addr) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=svc), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
            resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            names = {s.name for s in resp.list_services_response.service}
            assert svc in names and "grpc.health.v1.Health" in names
        assert stage_stack.metric(name, "mmpipe_%s_ready" % name) == 1.0


# --- parity with the offline LLM ------------------------------------------------------------------------------
def test_image_tokens_match_offline(stage_stack, offline_vl):
    from PIL import Image

    data = image_png(101)
    ph = offline_vl.adapter.placeholder_token("image")
    prompt = f"Look at {ph} and describe it."
    ref = offline_vl.generate({"prompt": prompt, "multi_modal_data": {"image": Image.open(io.BytesIO(data))}},
                              GREEDY, use_tqdm=False)[0]
    ids = offline_vl.tokenizer(prompt).input_ids
    got, refs = run(_pipeline(stage_stack, "image", data, ids, GREEDY))
    assert got == ref.outputs[0].token_ids
    assert refs[0].num_tokens > 1 and refs[0].meta["grid_thw"]


def test_audio_tokens_match_offline(audio_stage_stack, qwen2_audio_dir):
    import soundfile as sf

    from mmpipe import LLM

    llm = LLM(qwen2_audio_dir, device="cpu")
    sr = 16000
    t = np.arange(sr) / sr
    wav = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(3).standard_normal(sr)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format="WAV", subtype="FLOAT")
    ph = llm.adapter.placeholder_token("audio")
    prompt = f"Audio: {ph} what is it?"
    ref = llm.generate({"prompt": prompt, "multi_modal_data": {"audio": (wav, sr)}}, GREEDY, use_tqdm=False)[0]
    got, _ = run(_pipeline(audio_stage_stack, "audio", buf.getvalue(), llm.tokenizer(prompt).input_ids, GREEDY))
    assert got == ref.outputs[0].token_ids


# --- each GPU stage holds only its own weights -----------------------------------------------------------------
def test_encoder_and_generator_each_hold_one_part(stage_stack, offline_vl):
    from mmpipe.shared.models.registry import held_weights

    full = held_weights(offline_vl.adapter).bytes
    towers = stage_stack.metric("encoder", "mmpipe_encoder_weights_bytes")
    lm = stage_stack.metric("generator", "mmpipe_generator_weights_bytes")
    assert 0 < towers < full and 0 < lm < full
    assert towers + lm == full  # the two stages together hold the model once


# --- caching: repeated media does no work -----------------------------------------------------------------------
def test_repeated_image_skips_processor_and_encoder(stage_stack):
    s = stage_stack
    data = image_png(202)

    def counts():
        return (s.metric("ingest", "mmpipe_ingest_items_preprocessed_total"),
                s.metric("encoder", "mmpipe_encoder_items_encoded_total"),
                s.metric("ingest", "mmpipe_ingest_media_loaded_total"))

    async def go():
        c = StageClients.connect(ingest=s.ingest_addr, encoder=s.encoder_addr)
        try:
            first = await c.ingest.ingest([MediaSource("image", data=data)])
            c1 = counts()
            second = await c.ingest.ingest([MediaSource("image", data=data)])
            c2 = counts()
            # by UUID: sent once with the payload, then without it (no fetch, no decode either)
            await c.ingest.ingest([MediaSource("image", data=image_png(203), uuid="cat-203")], tenant="t1")
            c3 = counts()
            third = await c.ingest.ingest([MediaSource("image", uuid="cat-203")], tenant="t1")
            c4 = counts()
            found = await c.encoder.lookup([LookupItem(key=first[0].key), LookupItem(modality="image", uuid="nope")])
            return first, second, third, (c1, c2, c3, c4), found
        finally:
            await c.close()

    first, second, third, (c1, c2, c3, c4), found = run(go())
    assert not first[0].cache_hit and second[0].cache_hit and third[0].cache_hit
    assert second[0].key == first[0].key and second[0].num_tokens == first[0].num_tokens
    assert c2[:2] == c1[:2], "second request with the same image preprocessed or encoded it again"
    assert c4 == c3, "a cached UUID-only item was fetched, preprocessed or encoded"
    assert found[0][0] and found[0][1].meta == first[0].meta and not found[1][0]


def test_a_known_image_whose_embedding_is_gone_is_decoded_and_encoded_again(stage_stack):
    """Ingest remembers the image bytes it decoded (it only hashes them when they come again): when the embedding
    has left the cache meanwhile, the image is decoded, preprocessed and encoded again, under the same key."""
    import redis

    s = stage_stack
    data = image_png(204)

    def counts():
        return (s.metric("ingest", "mmpipe_ingest_items_preprocessed_total"),
                s.metric("encoder", "mmpipe_encoder_items_encoded_total"))

    async def go():
        c = StageClients.connect(ingest=s.ingest_addr, encoder=s.encoder_addr)
        try:
            first = await c.ingest.ingest([MediaSource("image", data=data)])
            redis.Redis.from_url(s.redis_url).delete(first[0].key)
            c1 = counts()
            again = await c.ingest.ingest([MediaSource("image", data=data)])
            return first, again, c1, counts()
        finally:
            await c.close()

    first, again, c1, c2 = run(go())
    assert not again[0].cache_hit and again[0].key == first[0].key
    assert again[0].num_tokens == first[0].num_tokens and again[0].meta == first[0].meta
    assert c2[0] == c1[0] + 1 and c2[1] == c1[1] + 1


# --- bad input: clear 4xx-class codes, and the services keep serving ----------------------------------------------
def test_bad_input_gets_client_errors_and_service_keeps_serving(stage_stack, offline_vl):
    import torch

    s = stage_stack
    ph_ids = offline_vl.tokenizer(f"x {offline_vl.adapter.placeholder_token('image')}").input_ids

    async def expect(coro, cls, code_words):
        with pytest.raises(cls) as ei:
            await coro
        assert any(w in ei.value.message.lower() for w in code_words), ei.value.message
        return ei.value

    async def go():
        c = StageClients.connect(ingest=s.ingest_addr, encoder=s.encoder_addr, generator=s.generator_addr)
        try:
            await expect(c.ingest.ingest([MediaSource("image", data=b"not an image")]), InvalidInputError,
                         ["image", "decode"])
            await expect(c.ingest.ingest([MediaSource("image", url="http://127.0.0.1:9/x.png")]), MediaPolicyError,
                         ["allowed", "domain", "127.0.0.1"])
            await expect(c.ingest.ingest([MediaSource("image", path="/etc/passwd")]), MediaPolicyError,
                         ["local", "allowed", "path"])
            await expect(c.ingest.ingest([MediaSource("smell", data=b"x")]), InvalidInputError, ["smell"])
            await expect(c.ingest.ingest([MediaSource("image", data=image_png(1))] * 4), InvalidInputError,
                         ["at most 3"])
            e = await expect(c.ingest.ingest([MediaSource("image", uuid="never-seen")]), NotCachedError,
                             ["never-seen"])
            assert e.http_status == 400
            # user embeddings: wrong hidden size, then a good one
            grid = torch.tensor([[1, 4, 4]])  # qwen2-vl: 1x4x4 patches, merged 2x2 -> 4 rows
            await expect(c.encoder.put_embeddings([("image", {"image_embeds": torch.randn(4, 7),
                                                              "image_grid_thw": grid}, None)]),
                         InvalidInputError, ["hidden size"])
            good = await c.encoder.put_embeddings([("image", {"image_embeds": torch.randn(
                4, offline_vl.adapter.hidden_size), "image_grid_thw": grid}, "emb-1")])
            # generator: missing key, placeholder/embedding mismatch, token id out of range
            missing = good[0].__class__(key=good[0].key.replace("emb-1", "emb-gone"), modality="image")

            async def consume(it):
                async for _ in it:
                    pass

            await expect(consume(c.generator.generate("b1", ph_ids, [missing], GREEDY)), NotFoundError,
                         ["not in the cache"])
            await expect(consume(c.generator.generate("b2", ph_ids, [], GREEDY)), InvalidInputError, ["placeholder"])
            await expect(consume(c.generator.generate("b3", [10 ** 6], [], GREEDY)), InvalidInputError,
                         ["vocab", "token"])
            # and good requests still work
            refs = await c.ingest.ingest([MediaSource("image", data=image_png(303))])
            toks = [t async for ch in c.generator.generate("ok1", ph_ids, refs, GREEDY) for t in ch.token_ids]
            toks2 = [t async for ch in c.generator.generate("ok2", ph_ids, good, GREEDY) for t in ch.token_ids]
            return toks, toks2
        finally:
            await c.close()

    toks, toks2 = run(go())
    assert len(toks) == GREEDY.max_tokens and len(toks2) == GREEDY.max_tokens
    assert s.metric("ingest", "mmpipe_ingest_requests_total", code="INTERNAL") == 0
    assert s.metric("generator", "mmpipe_generator_requests_total", code="INTERNAL") == 0
    assert s.metric("encoder", "mmpipe_encoder_requests_total", code="INTERNAL") == 0


# --- cancellation frees the engine ----------------------------------------------------------------------------------
def test_cancelled_stream_frees_the_request(stage_stack, offline_vl):
    s = stage_stack
    ids = offline_vl.tokenizer("Tell me a very long story.").input_ids
    long = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True)

    async def go():
        c = StageClients.connect(generator=s.generator_addr)
        try:
            n = 0
            async for ch in c.generator.generate("long-1", ids, [], long):
                n += len(ch.token_ids)
                if n >= 3:
                    break  # closing the iterator cancels the RPC
            assert s.metric("generator", "mmpipe_generator_running_requests") >= 0
        finally:
            await c.close()

    run(go())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (s.metric("generator", "mmpipe_generator_engine_running_requests") == 0
                and s.metric("generator", "mmpipe_generator_running_requests") == 0):
            break
        time.sleep(0.1)
    assert s.metric("generator", "mmpipe_generator_engine_running_requests") == 0
    assert s.metric("generator", "mmpipe_generator_running_requests") == 0
    assert s.metric("generator", "mmpipe_generator_finished_requests_total", reason="abort") >= 1
    # engine gauges an operator graphs: KV usage back to 0 once nothing runs; steps by kind (CPU: all eager)
    assert s.metric("generator", "mmpipe_generator_engine_kv_cache_usage_ratio") == 0
    assert s.metric("generator", "mmpipe_generator_engine_steps_total", kind="eager") > 0
    assert s.metric("generator", "mmpipe_generator_engine_steps_total", kind="mixed_graph") == 0
    assert s.metric("generator", "mmpipe_generator_engine_steps_total", kind="prefill_graph") == 0
    assert s.metric("generator", "mmpipe_generator_engine_preemptions_total") == 0  # the default KV budget fits


# --- a dead encoder: fail fast with UNAVAILABLE, recover after a restart -------------------------------------------
def test_killed_encoder_fails_fast_and_recovers(stage_stack):
    s = stage_stack
    s.procs["encoder"].kill()

    async def ingest_once(seed):
        c = StageClients.connect(ingest=s.ingest_addr)
        try:
            return await c.ingest.ingest([MediaSource("image", data=image_png(seed))], timeout_s=30)
        finally:
            await c.close()

    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailableError) as ei:
        run(ingest_once(404))
    assert time.monotonic() - t0 < 5, "ingest hung on a dead encoder"
    assert ei.value.grpc_code == "UNAVAILABLE"

    s.restart("encoder")
    deadline = time.monotonic() + 15
    while True:  # the ingest's channel reconnects within its (short) backoff
        try:
            refs = run(ingest_once(405))
            break
        except ServiceUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    assert refs[0].num_tokens > 0


# --- media hardening on the real ingest process (issue 16; tests/media_craft.py builds the files) -----------------
def _ingest(stack, item, **kw):
    async def go():
        c = StageClients.connect(ingest=stack.ingest_addr)
        try:
            return await c.ingest.ingest([item], request_id="budget-test", **kw)
        finally:
            await c.close()

    return asyncio.run(go())


def test_ingest_refuses_crafted_png_and_mp4_from_headers_with_bounded_memory(stage_stack):
    from PIL import Image

    pid = stage_stack.procs["ingest"].proc.pid
    png, mp4 = rgba_png_bomb(), long_720p_mp4()
    assert len(png) < 400_000 and len(mp4) < 40_000  # small on disk ...
    before = hwm(pid)
    with pytest.raises(InvalidInputError, match="max-image-decode-pixels") as e:
        _ingest(stage_stack, MediaSource("image", data=png))
    assert "9000x9000" in e.value.message
    with pytest.raises(InvalidInputError, match="max-request-pixels") as e:
        _ingest(stage_stack, MediaSource("video", data=mp4))
    assert "350 frames of 1280x720" in e.value.message
    grown = hwm(pid) - before
    assert grown < RSS_BOUND, f"ingest's peak RSS grew by {grown >> 20} MiB"
    # ... and the same ingest still serves a normal request
    ok = Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 56, 4), dtype=np.uint8), "RGBA")
    b = io.BytesIO()
    ok.save(b, "PNG")
    (ref,) = _ingest(stage_stack, MediaSource("image", data=b.getvalue()))
    assert ref.key and ref.num_tokens > 0


def test_ingest_with_decode_workers_survives_a_crashing_and_a_hanging_decoder(stage_stack, qwen2_vl_dir,
                                                                               monkeypatch):
    monkeypatch.setenv(TEST_FAULTS_ENV, "1")  # the ingest process and its workers only
    sp = start_stage_process("ingest", qwen2_vl_dir, stage_stack.redis_url, encoder_addr=stage_stack.encoder_addr,
                             extra=["--decode-workers", "2", "--decode-timeout", "2"], log_dir=stage_stack.log_dir)
    try:
        async def one(data: bytes):
            c = StageClients.connect(ingest=sp.addr)
            try:
                return await c.ingest.ingest([MediaSource("image", data=data)], request_id="pool-test")
            except InvalidInputError as e:
                return e
            finally:
                await c.close()

        async def load():
            good = [image_png(100 + i) for i in range(8)]
            bad = [b"MMPIPE-FAULT:abort", b"MMPIPE-FAULT:hang ", b"MMPIPE-FAULT:segv "]
            return await asyncio.gather(*[one(d) for d in good[:4] + bad + good[4:]])

        out = asyncio.run(load())
        good, bad = out[:4] + out[7:], out[4:7]
        assert all(isinstance(r, list) and r[0].num_tokens > 0 for r in good), good
        assert all(isinstance(e, InvalidInputError) and "items[0]" in e.message for e in bad), bad
        assert "SIGABRT" in bad[0].message and "longer than 2 s" in bad[1].message and "SIGSEGV" in bad[2].message
        wait_healthy(sp.addr, 3.0, sp.proc, sp.log_path)  # still SERVING
        assert sp.proc.poll() is None
        (again,) = asyncio.run(one(image_png(120)))
        assert again.num_tokens > 0
    finally:
        sp.stop()
