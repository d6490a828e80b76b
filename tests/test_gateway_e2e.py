"""The gateway end to end: real stage processes, a real redis-server, the gateway process, the `openai` client.

One stack for the module, on the tiny Qwen2.5-Omni thinker (image, video and audio in one model): the
three stages from tests/services_helpers.py plus `mmpipe gateway` with an api key, a per-prompt limit,
user embeddings enabled, 127.0.0.1 as the only media domain and a local media folder. Ingest runs with
redirects off and a 2 MB download cap. Every content type must give the token ids of the offline `LLM`.
"""
from __future__ import annotations

import base64
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from services_helpers import (GatewayProcess, StageStack, scrape, start_gateway_process, start_stage_process,
                             stop_together, wait_healthy)



KEY = "sk-gateway-test"
LIMITS = '{"image": 2, "video": 1, "audio": 1}'
MAX_DOWNLOAD = 2_000_000
GREEDY = dict(temperature=0.0, max_tokens=8)
EXTRA = {"ignore_eos": True, "return_token_ids": True}


# --- media -------------------------------------------------------------------------------------------------
def png(seed: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (84, 112, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def wav(seed: int = 2) -> bytes:
    import soundfile as sf

    t = np.arange(16000) / 16000
    a = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(seed).standard_normal(t.shape))
    buf = io.BytesIO()
    sf.write(buf, a.astype(np.float32), 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def data_url(b: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(b).decode()


class _MediaHandler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802
        if self.path == "/redirect.png":
            self.send_response(302)
            self.send_header("Location", "/img.png")
            self.end_headers()
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


# --- the stack ---------------------------------------------------------------------------------------------
@dataclass
class Env:
    model: str
    stack: StageStack
    gw: GatewayProcess
    media_dir: Path
    media_url: str
    llm: object

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gw.url}/v1", api_key=KEY, max_retries=0, **kw)

    def metric(self, stage: str, name: str, **labels) -> float:
        return self.stack.metric(stage, name, **labels)

    def gw_metric(self, name: str, **labels) -> float:
        return scrape(f"{self.gw.url}/metrics", name, **labels)


def start_gateway(model: str, addrs: dict[str, str], redis_url: str, media_dir: Path, log_dir: Path
                  ) -> GatewayProcess:
    return start_gateway_process(model, addrs, log_dir, [
        "--redis-url", redis_url, "--api-key", KEY, "--limit-mm-per-prompt", LIMITS, "--enable-mm-embeds",
        "--allowed-media-domains", "127.0.0.1", "--allow-private-media-urls", "--allowed-local-media-path",
        str(media_dir), "--shutdown-grace-s", "5"])


@pytest.fixture(scope="module")
def env(redis_server, tmp_path_factory):
    from mmpipe.shared.models.tiny import ensure_tiny_model
    from offline_helpers import make_video, write_mp4

    model = str(ensure_tiny_model("qwen2_5_omni"))
    media_dir = tmp_path_factory.mktemp("gw-media")
    write_mp4(media_dir / "clip.mp4", make_video(n=4, h=64, w=96, seed=1))
    _MediaHandler.files = {"/img.png": png(7), "/audio.wav": wav(3), "/big.bin": b"\0" * (MAX_DOWNLOAD + 1)}
    http = ThreadingHTTPServer(("127.0.0.1", 0), _MediaHandler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    # Ingest reads these at start-up: redirects refused, downloads capped.
    saved = {k: os.environ.get(k) for k in ("MMPIPE_MEDIA_URL_ALLOW_REDIRECTS", "MMPIPE_MEDIA_MAX_BYTES")}
    os.environ.update(MMPIPE_MEDIA_URL_ALLOW_REDIRECTS="0", MMPIPE_MEDIA_MAX_BYTES=str(MAX_DOWNLOAD))
    stack = StageStack(model, redis_server)
    gw = None
    try:
        # Everything starts at once (the gateway waits for the stages itself): start-up is dominated by
        # imports, which overlap on two cores better than they add up.
        enc = start_stage_process("encoder", model, redis_server, extra=["--enable-mm-embeds"],
                                  log_dir=stack.log_dir, wait=False)
        gen = start_stage_process("generator", model, redis_server, log_dir=stack.log_dir, wait=False)
        ing = start_stage_process("ingest", model, redis_server, encoder_addr=enc.addr, log_dir=stack.log_dir,
                                  wait=False, extra=["--allowed-media-domains", "127.0.0.1", "--allow-private-media-urls",
                                                     "--allowed-local-media-path", str(media_dir),
                                                     "--limit-mm-per-prompt", LIMITS])
        stack.procs = {"encoder": enc, "generator": gen, "ingest": ing}
        gw = start_gateway(model, {s: p.addr for s, p in stack.procs.items()}, redis_server, media_dir,
                           stack.log_dir)
        from mmpipe import LLM

        llm = LLM(model, device="cpu", allowed_local_media_path=str(media_dir), enable_mm_embeds=True,
                  allow_private_media_urls=True)  # the media server is on 127.0.0.1
        for p in stack.procs.values():
            wait_healthy(p.addr, 120, p.proc, p.log_path)
        gw.wait_healthy()
        yield Env(model, stack, gw, media_dir, f"http://127.0.0.1:{http.server_port}", llm)
    finally:
        stop_together(gw, stack)
        http.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe it."}]}]


def offline_ids(env: Env, messages) -> list[int]:
    from mmpipe import SamplingParams

    out = env.llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return out[0].outputs[0].token_ids


def gateway_ids(env: Env, messages, **kw) -> list[int]:
    r = env.client().chat.completions.create(model="tiny", messages=messages, **GREEDY, extra_body=EXTRA, **kw)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    return r.choices[0].token_ids


def embeds_part(env: Env, seed: int, hidden: int | None = None) -> dict:
    import torch

    from mmpipe.shared.media.embeds import encode_tensor_b64

    h = hidden or env.llm.adapter.hidden_size
    t = torch.randn(4, h, generator=torch.Generator().manual_seed(seed)) * 2
    # grid (t, h, w) = 16 patches, merged 2x2: 4 rows. Integer metadata goes as a JSON list: the one safe
    # tensor decoder (shared/media/embeds.py) only takes float tensors.
    return {"type": "image_embeds",
            "image_embeds": {"image_embeds": encode_tensor_b64(t), "image_grid_thw": [[1, 4, 4]]}}


# --- parity: every content type ------------------------------------------------------------------------------
def test_every_content_type_matches_offline_llm(env):
    audio_b64 = base64.b64encode(wav(4)).decode()
    cases = {
        "image_url data URL": [{"type": "image_url", "image_url": {"url": data_url(png(1))}}],
        "image_url http URL": [{"type": "image_url", "image_url": {"url": f"{env.media_url}/img.png"}}],
        "video_url local file": [{"type": "video_url", "video_url": {"url": f"file://{env.media_dir}/clip.mp4"}}],
        "input_audio": [{"type": "input_audio", "input_audio": {"data": audio_b64, "format": "wav"}}],
        "audio_url": [{"type": "audio_url", "audio_url": {"url": f"{env.media_url}/audio.wav"}}],
        "image_embeds": [embeds_part(env, 1)],
        "two image_embeds": [embeds_part(env, 2), embeds_part(env, 3)],
        "image + video + audio": [{"type": "image_url", "image_url": {"url": data_url(png(5))}},
                                  {"type": "video_url", "video_url": {"url": f"file://{env.media_dir}/clip.mp4"}},
                                  {"type": "input_audio", "input_audio": {"data": audio_b64, "format": "wav"}}],
    }
    for name, parts in cases.items():
        msgs = user(*parts)
        assert gateway_ids(env, msgs) == offline_ids(env, msgs), name


def test_completions_text_and_token_ids_match_offline(env):
    from mmpipe import SamplingParams

    ref = env.llm.generate("The quick brown fox", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                           use_tqdm=False)[0]
    c = env.client()
    r = c.completions.create(model="tiny", prompt="The quick brown fox", **GREEDY, extra_body=EXTRA)
    assert r.choices[0].token_ids == ref.outputs[0].token_ids and r.choices[0].text == ref.outputs[0].text
    r2 = c.completions.create(model="tiny", prompt=ref.prompt_token_ids, **GREEDY, extra_body=EXTRA)
    assert r2.choices[0].token_ids == ref.outputs[0].token_ids
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="The quick brown fox", stream=True, **GREEDY, extra_body={"ignore_eos": True}))
    assert streamed == ref.outputs[0].text


def test_completions_list_of_prompts_and_echo_match_offline(env):
    from mmpipe import SamplingParams
    from transformers import AutoTokenizer

    prompts = ["The quick brown fox", "A tiny random model says"]
    refs = env.llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    want = [ref.outputs[0].token_ids for ref in refs]
    c = env.client()
    r = c.completions.create(model="tiny", prompt=prompts, **GREEDY, extra_body=EXTRA)
    assert [ch.index for ch in r.choices] == [0, 1] and [ch.token_ids for ch in r.choices] == want
    assert [ch.prompt_token_ids for ch in r.choices] == [ref.prompt_token_ids for ref in refs]
    assert r.usage.completion_tokens == 16
    assert r.usage.prompt_tokens == sum(len(ref.prompt_token_ids) for ref in refs)
    # echo on token-id prompts: the decoded prompt, then the completion (vLLM's echo)
    decode = AutoTokenizer.from_pretrained(env.model).decode
    r = c.completions.create(model="tiny", prompt=[ref.prompt_token_ids for ref in refs], echo=True, **GREEDY,
                             extra_body=EXTRA)
    assert [ch.text for ch in r.choices] == [decode(ref.prompt_token_ids) + ref.outputs[0].text for ref in refs]
    assert [ch.token_ids for ch in r.choices] == want  # echo changes the text, not what is generated
    # streamed: chunks of both choices interleave, each keeps its index; the prompt comes with its first chunk
    texts, usage = {0: "", 1: ""}, None
    for chunk in c.completions.create(model="tiny", prompt=prompts, echo=True, stream=True,
                                      stream_options={"include_usage": True}, **GREEDY,
                                      extra_body={"ignore_eos": True}):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
        usage = chunk.usage or usage
    assert texts == {i: prompts[i] + refs[i].outputs[0].text for i in range(2)}
    assert usage.completion_tokens == 16
    # echo + logprobs: the prompt tokens' logprobs first (the first one null), as vLLM; the oracle is the offline
    # LLM's prompt_logprobs and logprobs of the same request
    ref = env.llm.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=2,
                                                      prompt_logprobs=2), use_tqdm=False)[0]
    ch = c.completions.create(model="tiny", prompt=prompts[0], echo=True, logprobs=2, temperature=0.0, max_tokens=3,
                              extra_body={"ignore_eos": True}).choices[0]
    ids = ref.prompt_token_ids + ref.outputs[0].token_ids
    lp = ch.logprobs
    assert lp.tokens == [decode([t]) for t in ids] and ch.text == prompts[0] + ref.outputs[0].text
    assert lp.text_offset == [sum(len(decode([t])) for t in ids[:i]) for i in range(len(ids))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and ref.prompt_logprobs[0] is None
    want = [e[1] for e in ref.prompt_logprobs[1:]] + list(ref.outputs[0].logprobs)
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    want_tops = [e[3] for e in ref.prompt_logprobs[1:]] + list(ref.outputs[0].top_logprobs)
    for got, alts in zip(lp.top_logprobs[1:], want_tops, strict=True):
        assert got == pytest.approx({decode([a]): v for a, v in alts}, abs=1e-4)
    assert getattr(ch, "prompt_logprobs", None) is None  # only when asked for by name (vLLM)


def test_streamed_echo_logprobs_concatenate_to_the_whole_answer(env):
    """echo + logprobs + stream (vLLM's shape): each choice's first chunk carries the echoed prompt with its
    tokens' logprobs (the first one null) and its first generated tokens', later chunks (if any) the rest; a
    choice's chunks, concatenated, are its non-streamed answer, for several prompts with n=2 seeded samples each."""
    from transformers import AutoTokenizer

    prompts = ["The quick brown fox", "A tiny random model says"]
    kw = dict(model="tiny", prompt=prompts, echo=True, logprobs=2, n=2, temperature=1.0, seed=5, max_tokens=5,
              extra_body={"ignore_eos": True})
    c = env.client()
    n_prompt = [len(ids) for ids in AutoTokenizer.from_pretrained(env.model)(prompts).input_ids]
    whole = {ch.index: ch for ch in c.completions.create(**kw).choices}
    assert sorted(whole) == [0, 1, 2, 3]
    got: dict[int, dict] = {i: {"text": "", "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [],
                                "chunks": 0} for i in whole}
    finish, usage = {}, None
    for chunk in c.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for ch in chunk.choices:
            g = got[ch.index]
            if g["chunks"] == 0:  # the first chunk: the whole prompt with its logprobs, then generated tokens
                assert ch.text.startswith(prompts[ch.index // 2])
                assert len(ch.logprobs.tokens) > n_prompt[ch.index // 2]
                assert ch.logprobs.token_logprobs[0] is None and ch.logprobs.top_logprobs[0] is None
                assert ch.logprobs.text_offset[0] == 0
            g["chunks"] += 1
            g["text"] += ch.text
            for f in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                g[f] += getattr(ch.logprobs, f) or []
            finish[ch.index] = ch.finish_reason or finish.get(ch.index)
    assert usage.completion_tokens == 20 and finish == {i: "length" for i in whole}
    texts = set()
    for i, ch in whole.items():
        g, lp = got[i], ch.logprobs
        assert g["text"] == ch.text and g["tokens"] == lp.tokens and g["text_offset"] == lp.text_offset, i
        assert g["token_logprobs"][0] is None and lp.token_logprobs[0] is None
        assert g["token_logprobs"][1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
        assert g["top_logprobs"][0] is None and len(g["top_logprobs"]) == len(lp.top_logprobs)
        for a, b in zip(g["top_logprobs"][1:], lp.top_logprobs[1:]):
            assert a == pytest.approx(b, abs=1e-4)
        # how many chunks follow the first is timing, not asserted: tokens made while a write waits are coalesced
        # into one message (test_generator_streaming.py), so on a loaded box all five can ride in the first chunk
        texts.add(ch.text)
    assert len(texts) == 4  # seeded samples differ: each choice was matched with its own stream


def test_tokenize_counts_what_the_generation_endpoints_send(env):
    msgs = user({"type": "image_url", "image_url": {"url": data_url(png(3))}})
    auth = {"Authorization": f"Bearer {KEY}"}
    r = env.client().chat.completions.create(model="tiny", messages=msgs, **GREEDY, extra_body=EXTRA)
    t = httpx.post(f"{env.gw.url}/tokenize", json={"model": "tiny", "messages": msgs}, headers=auth, timeout=30)
    assert t.status_code == 200, t.text
    # exactly the ids the chat request sent the generator, which expands the one image placeholder into its
    # embedding rows (usage counts those)
    assert t.json()["tokens"] == r.prompt_token_ids and t.json()["count"] < r.usage.prompt_tokens
    cmp = env.client().completions.create(model="tiny", prompt="Count to three.", **GREEDY, extra_body=EXTRA)
    t = httpx.post(f"{env.gw.url}/tokenize", json={"prompt": "Count to three."}, headers=auth, timeout=30).json()
    assert t["tokens"] == cmp.choices[0].prompt_token_ids and t["count"] == cmp.usage.prompt_tokens
    d = httpx.post(f"{env.gw.url}/detokenize", json={"tokens": t["tokens"]}, headers=auth, timeout=30).json()
    assert d == {"prompt": "Count to three."}


# --- repeated media: no stage work --------------------------------------------------------------------------------
def test_repeated_image_by_hash_and_by_uuid_skips_the_work(env):
    msgs = user({"type": "image_url", "image_url": {"url": data_url(png(11))}, "uuid": "cat-11"})
    first = gateway_ids(env, msgs)
    work = lambda: (env.metric("ingest", "mmpipe_ingest_items_preprocessed_total"),  # noqa: E731
                    env.metric("encoder", "mmpipe_encoder_items_encoded_total"))
    ingest_calls = lambda: env.metric("ingest", "mmpipe_ingest_requests_total", method="Ingest")  # noqa: E731
    loaded = lambda: env.metric("ingest", "mmpipe_ingest_media_loaded_total")  # noqa: E731
    before, calls, n_loaded = work(), ingest_calls(), loaded()
    hits = env.gw_metric("mmpipe_gateway_mm_cache_hits_total", how="uuid")
    # by UUID with the payload left out: nothing is fetched, ingest is not even called
    only_uuid = user({"type": "image_url", "image_url": None, "uuid": "cat-11"})
    assert gateway_ids(env, only_uuid) == first
    assert work() == before and ingest_calls() == calls and loaded() == n_loaded
    assert env.gw_metric("mmpipe_gateway_mm_cache_hits_total", how="uuid") == hits + 1
    # by content hash: ingest loads and hashes it, but nothing is preprocessed or encoded again
    plain = user({"type": "image_url", "image_url": {"url": data_url(png(12))}})
    ids = gateway_ids(env, plain)
    before = work()
    assert gateway_ids(env, plain) == ids
    assert work() == before
    assert env.gw_metric("mmpipe_gateway_mm_cache_hits_total", how="hash") >= 1


# --- clear 4xx, and the next good request succeeds -----------------------------------------------------------------
def test_bad_inputs_are_clear_4xx_and_the_next_request_succeeds(env):
    c = env.client()
    good = user({"type": "image_url", "image_url": {"url": data_url(png(21))}})
    bad = {
        "uncached uuid": ([{"type": "image_url", "image_url": None, "uuid": "never-seen-42"}], 400, "never-seen-42"),
        "malformed base64 tensor": ([{"type": "image_embeds", "image_embeds": {
            "image_embeds": "%%%not base64", "image_grid_thw": "AAAA"}}], 400, "base64"),
        "wrong hidden size": ([embeds_part(env, 4, hidden=env.llm.adapter.hidden_size + 1)], 400, "hidden size"),
        "refused domain": ([{"type": "image_url", "image_url": {"url": "http://example.org/cat.png"}}], 403,
                           "example.org"),
        "redirect while redirects are off": (
            [{"type": "image_url", "image_url": {"url": f"{env.media_url}/redirect.png"}}], 403, "redirect"),
        "path outside the allowed folder": (
            [{"type": "video_url", "video_url": {"url": f"file://{env.media_dir}/../../etc/passwd"}}], 403,
            "outside"),
        "oversized download": ([{"type": "image_url", "image_url": {"url": f"{env.media_url}/big.bin"}}], 400,
                               "larger than"),
        "too many items": ([{"type": "image_url", "image_url": {"url": data_url(png(s))}} for s in (1, 2, 3)],
                           400, "at most 2"),
    }
    for name, (parts, status, needle) in bad.items():
        with pytest.raises(openai.APIStatusError) as ei:
            c.chat.completions.create(model="tiny", messages=user(*parts), **GREEDY)
        assert ei.value.status_code == status, (name, ei.value.body)
        assert needle in ei.value.body["message"], (name, ei.value.body)
        assert gateway_ids(env, good), name  # the gateway and the stages are fine afterwards


def test_api_key_and_request_id(env):
    no_key = openai.OpenAI(base_url=f"{env.gw.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_key.models.list()
    assert [m.id for m in env.client().models.list().data] == ["tiny"]
    r = httpx.post(f"{env.gw.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}",
                                                                  "X-Request-Id": "trace-me-1"},
                   json={"model": "tiny", "messages": user(), "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-me-1"
    assert r.json()["id"] == "chatcmpl-trace-me-1"


# --- streaming and disconnects ---------------------------------------------------------------------------------------
def test_streaming_matches_non_streaming(env):
    msgs = user({"type": "image_url", "image_url": {"url": data_url(png(31))}})
    c = env.client()
    full = c.chat.completions.create(model="tiny", messages=msgs, **GREEDY, extra_body=EXTRA)
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, stream=True, **GREEDY, extra_body=EXTRA,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    ids = [t for ch in chunks if ch.choices for t in (getattr(ch.choices[0], "token_ids", None) or [])]
    assert text == full.choices[0].message.content and ids == full.choices[0].token_ids
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_prefix_cache_hits_are_reported_in_usage(env):
    """OpenAI's usage.prompt_tokens_details.cached_tokens carries the generator's prefix-cache hits: a repeated
    image chat reuses its blocks (same tokens), one with another image does not reuse that image's blocks."""
    def msgs(seed: int) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png(seed))}},
                                             {"type": "text", "text": "Describe it, " * 24}]}]

    c = env.client()
    first = c.chat.completions.create(model="tiny", messages=msgs(41), **GREEDY, extra_body=EXTRA)
    second = c.chat.completions.create(model="tiny", messages=msgs(41), **GREEDY, extra_body=EXTRA)
    other = c.chat.completions.create(model="tiny", messages=msgs(42), **GREEDY, extra_body=EXTRA)
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in (first, second, other)]
    assert second.choices[0].token_ids == first.choices[0].token_ids
    assert second.usage.prompt_tokens == first.usage.prompt_tokens == other.usage.prompt_tokens
    assert cached[1] > cached[0] and cached[1] > cached[2], cached
    assert cached[1] < second.usage.prompt_tokens  # at least one prompt token is always computed
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs(41), stream=True, **GREEDY, extra_body=EXTRA,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached[1]


def _wait_for(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_mid_stream_frees_the_generator_slot(env):
    aborted = env.metric("generator", "mmpipe_generator_finished_requests_total", reason="abort")
    generated = env.metric("generator", "mmpipe_generator_generation_tokens_total")
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", f"{env.gw.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "messages": user(), "max_tokens": 1900, "ignore_eos": True,
                            "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
    # the connection is closed: the gateway cancels the generator call, which aborts it in the engine
    assert _wait_for(lambda: env.metric("generator", "mmpipe_generator_finished_requests_total", reason="abort")
                     == aborted + 1), "the generator request was not aborted"
    assert env.metric("generator", "mmpipe_generator_running_requests") == 0
    assert env.metric("generator", "mmpipe_generator_generation_tokens_total") - generated < 1900
    assert _wait_for(lambda: env.gw_metric("mmpipe_gateway_requests_in_flight") == 0)


# --- the public gRPC API ---------------------------------------------------------------------------------------
def test_grpc_client_chat_and_generate(env):
    from mmpipe.client import MMPipeClient
    from mmpipe.shared.errors import AuthenticationError, NotCachedError

    msgs = user({"type": "image_url", "image_url": {"url": data_url(png(41))}})
    ref = offline_ids(env, msgs)
    with MMPipeClient(f"127.0.0.1:{env.gw.grpc_port}", api_key=KEY, timeout=60) as cl:
        out = cl.chat(msgs, temperature=0.0, max_tokens=8, ignore_eos=True)
        assert out.token_ids == ref and out.finish_reason == "length" and out.usage["completion_tokens"] == 8
        chunks = list(cl.chat(msgs, stream=True, temperature=0.0, max_tokens=8, ignore_eos=True))
        assert [t for ch in chunks for t in ch.token_ids] == ref and "".join(ch.text for ch in chunks) == out.text
        gen = cl.generate("The quick brown fox", temperature=0.0, max_tokens=4, ignore_eos=True)
        assert len(gen.token_ids) == 4
        echoed = list(cl.generate("The quick brown fox", stream=True, echo=True, temperature=0.0, max_tokens=4,
                                  ignore_eos=True))
        assert echoed[0].text.startswith("The quick brown fox")  # the prompt comes with the first chunk
        assert "".join(c.text for c in echoed) == "The quick brown fox" + gen.text
        assert cl.tokenize(messages=msgs).count < out.usage["prompt_tokens"]  # one placeholder, expanded later
        with pytest.raises(NotCachedError) as ei:
            cl.chat(user({"type": "image_url", "image_url": None, "uuid": "grpc-unknown"}), max_tokens=2)
        assert "grpc-unknown" in ei.value.message
    with MMPipeClient(f"127.0.0.1:{env.gw.grpc_port}") as anon, pytest.raises(AuthenticationError):
        anon.generate("hi", max_tokens=2)


def test_grpc_qwen_image_embeds_take_an_integer_grid_and_errors_stay_client_errors(env):
    """issue 16: over the public gRPC API `image_grid_thw` (a base64 tensor) was decoded as float-only, so an
    int64 grid was refused and a float one was INTERNAL; user text in an error (non-ASCII, or longer than gRPC's
    metadata limit) turned a client error into INTERNAL / RESOURCE_EXHAUSTED."""
    import torch

    from mmpipe.client import MMPipeClient
    from mmpipe.shared.errors import InvalidInputError
    from mmpipe.shared.media.embeds import encode_tensor_b64

    http_part = embeds_part(env, 9)
    ref = offline_ids(env, user(http_part))
    grpc_part = {"type": "image_embeds", "image_embeds": {
        "image_embeds": http_part["image_embeds"]["image_embeds"],
        "image_grid_thw": encode_tensor_b64(torch.tensor([[1, 4, 4]], dtype=torch.int64))}}
    with MMPipeClient(f"127.0.0.1:{env.gw.grpc_port}", api_key=KEY, timeout=60) as cl:
        out = cl.chat(user(grpc_part), temperature=0.0, max_tokens=8, ignore_eos=True)
        assert out.token_ids == ref
        grpc_part["image_embeds"]["image_grid_thw"] = encode_tensor_b64(torch.tensor([[1.0, 4.0, 4.0]]))
        with pytest.raises(InvalidInputError, match="dtype"):
            cl.chat(user(grpc_part), max_tokens=2)
        for uuid in ("caf\u00e9-\u4e2d\u6587", "u" * 20_000):
            with pytest.raises(InvalidInputError) as ei:  # not cached, or too long: a 400 either way
                cl.chat(user({"type": "image_url", "image_url": None, "uuid": uuid}), max_tokens=2)
            assert ei.value.message.isascii() and len(ei.value.message) <= 1024
        assert len(cl.generate("still serving", max_tokens=2).token_ids) == 2


def test_gateway_grpc_health_and_reflection(env):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{env.gw.grpc_port}") as ch:
        # the gateway's gRPC health follows the stages, which an earlier test may have just restarted:
        # poll (bounded) instead of asserting on the first answer
        stub, deadline = health_pb2_grpc.HealthStub(ch), time.monotonic() + 30
        while True:
            r = stub.Check(health_pb2.HealthCheckRequest(service="mmpipe.v1.Gateway"), timeout=5)
            if r.status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    m = httpx.get(f"{env.gw.url}/metrics").text
    for name in ("mmpipe_gateway_time_to_first_token_seconds_count", "mmpipe_gateway_time_per_output_token_seconds",
                 "mmpipe_gateway_prompt_tokens_total", "mmpipe_gateway_generation_tokens_total",
                 "mmpipe_gateway_requests_in_flight", "mmpipe_gateway_mm_cache_misses_total"):
        assert name in m, name


# --- vLLM's sampling options: n, top_logprobs, penalties -------------------------------------------------------------
def test_n_top_logprobs_and_penalties_through_the_openai_client(env):
    """n=2 with a seed: two distinct choices, the same on a repeat and the same as the offline LLM's samples,
    streamed per index; usage counts the prompt once and every choice's tokens; top_logprobs carry real
    alternatives; a penalty gives the offline LLM's answer."""
    from mmpipe import SamplingParams

    msgs = user({"type": "image_url", "image_url": {"url": data_url(png(61))}})
    c = env.client()
    kw = dict(model="tiny", messages=msgs, temperature=1.0, max_tokens=8, seed=11, n=2, extra_body=EXTRA)
    r = c.chat.completions.create(**kw)
    assert [ch.index for ch in r.choices] == [0, 1]
    ids = [ch.token_ids for ch in r.choices]
    assert ids[0] != ids[1] and [ch.token_ids for ch in c.chat.completions.create(**kw).choices] == ids
    off = env.llm.chat(msgs, SamplingParams(temperature=1.0, max_tokens=8, seed=11, n=2, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [o.token_ids for o in off.outputs] == ids
    assert r.usage.prompt_tokens == len(off.prompt_token_ids) and r.usage.completion_tokens == 16
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed: dict[int, list[int]] = {0: [], 1: []}
    finish = {}
    for ch in chunks:
        for choice in ch.choices:
            streamed[choice.index] += getattr(choice, "token_ids", None) or []
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert [streamed[0], streamed[1]] == ids and finish == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens

    lp = c.chat.completions.create(model="tiny", messages=msgs, **GREEDY, logprobs=True, top_logprobs=3,
                                   extra_body=EXTRA)
    want = env.llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=8, logprobs=3, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    tok = env.llm.tokenizer
    content = lp.choices[0].logprobs.content
    assert len(content) == 8 and all(len(e.top_logprobs) == 3 for e in content)
    for e, alts, t in zip(content, want.top_logprobs, want.token_ids):
        assert [a.token for a in e.top_logprobs] == [tok.decode([i]) for i, _ in alts]
        assert [a.logprob for a in e.top_logprobs] == pytest.approx([v for _, v in alts], abs=1e-4)
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)  # greedy: the best one

    pen = dict(presence_penalty=1.5, frequency_penalty=1.0)
    got = c.chat.completions.create(model="tiny", messages=msgs, **GREEDY, **pen,
                                    extra_body={**EXTRA, "repetition_penalty": 1.3})
    ref = env.llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, repetition_penalty=1.3,
                                            **pen), use_tqdm=False)[0].outputs[0]
    assert got.choices[0].token_ids == ref.token_ids

    comp = c.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=4, temperature=1.0, seed=3,
                                n=2, logprobs=2, extra_body=EXTRA)
    assert [ch.index for ch in comp.choices] == [0, 1] and comp.usage.completion_tokens == 8
    assert all(len(ch.logprobs.top_logprobs) == 4 and all(1 <= len(d) <= 2 for d in ch.logprobs.top_logprobs)
               for ch in comp.choices)
    plp = c.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=2,
                               extra_body={"prompt_logprobs": 2}).choices[0].prompt_logprobs
    ref = env.llm.generate("The quick brown fox", SamplingParams(max_tokens=2, prompt_logprobs=2),
                           use_tqdm=False)[0]
    assert len(plp) == len(ref.prompt_token_ids) and plp[0] is None and ref.prompt_logprobs[0] is None
    for got_d, (tid, lp, rank, alts) in zip(plp[1:], ref.prompt_logprobs[1:]):
        assert got_d[str(tid)]["logprob"] == pytest.approx(lp, abs=1e-4) and got_d[str(tid)]["rank"] == rank
        assert all(str(a) in got_d for a, _ in alts)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, logit_bias={"99999999": 5})
    assert "logit_bias" in str(e.value)
    assert c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2).choices  # still serving


def test_grpc_client_n_and_top_logprobs(env):
    from mmpipe.client import MMPipeClient

    msgs = user({"type": "image_url", "image_url": {"url": data_url(png(62))}})
    with MMPipeClient(f"127.0.0.1:{env.gw.grpc_port}", api_key=KEY, timeout=60) as cl:
        out = cl.chat(msgs, temperature=1.0, max_tokens=6, ignore_eos=True, seed=5, n=2, logprobs=True,
                      top_logprobs=2, frequency_penalty=0.5, prompt_logprobs=1)
    assert [r.index for r in out.choices] == [0, 1] and out.usage["completion_tokens"] == 12
    assert out.choices[0].token_ids != out.choices[1].token_ids
    assert all(len(r.top_logprobs) == 6 and all(len(a) == 2 for a in r.top_logprobs) for r in out.choices)
    plp = out.prompt_logprobs
    assert plp[0] is None and len(plp) == out.usage["prompt_tokens"]
    assert all(rank >= 1 and len(alts) == 1 and lp <= 0 for _, lp, rank, alts in plp[1:])


# --- faults (last: restarts the generator) ---------------------------------------------------------------------------
@pytest.mark.slow
def test_killing_the_generator_fails_in_flight_requests_fast_then_recovers(env):
    c = env.client(timeout=60)

    def long_request(_):
        t0 = time.monotonic()
        try:
            c.chat.completions.create(model="tiny", messages=user(), max_tokens=1900,
                                      extra_body={"ignore_eos": True})
            return "ok", time.monotonic() - t0
        except openai.APIStatusError as e:
            return e.status_code, time.monotonic() - t0

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(long_request, i) for i in range(4)]
        assert _wait_for(lambda: env.metric("generator", "mmpipe_generator_running_requests") >= 1, 20)
        killed_at = time.monotonic()
        env.stack.procs["generator"].kill()
        results = [f.result(timeout=30) for f in futures]
    print("after killing the generator:", results)
    assert all(status == 503 for status, _ in results), results
    assert time.monotonic() - killed_at < 10, "in-flight requests did not fail fast"
    r = httpx.get(f"{env.gw.url}/health")
    assert r.status_code == 503 and r.json()["stages"]["generator"] != "SERVING"
    env.stack.restart("generator")
    assert _wait_for(lambda: httpx.get(f"{env.gw.url}/health").status_code == 200, 20)
    msgs = user({"type": "image_url", "image_url": {"url": data_url(png(51))}})
    assert gateway_ids(env, msgs) == offline_ids(env, msgs)
