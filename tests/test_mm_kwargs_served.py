"""Per-request media settings through the served stack: the official `openai` client (extra_body) and the public
gRPC client against `mmpipe gateway` in front of the real ingest / encoder / generator processes (tiny qwen2_vl,
a real redis-server), each answer checked token for token against transformers' `model.generate(**processor(...))`.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import torch
from services_helpers import start_gateway_process

from offline_helpers import chat_prompt, oracle_model

SMALL = 56 * 84  # a non-default max_pixels (the tiny processor's longest_edge is 112 * 112)
QUESTION = "Describe the image."


def _png(seed: int) -> tuple[object, str]:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (84, 112, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return img, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def gateway(stage_stack, qwen2_vl_dir, tmp_path_factory):
    addrs = {"ingest": stage_stack.ingest_addr, "encoder": stage_stack.encoder_addr,
             "generator": stage_stack.generator_addr}
    gw = start_gateway_process(qwen2_vl_dir, addrs, tmp_path_factory.mktemp("gw"),
                               ["--shutdown-grace-s", "5", "--enable-mm-embeds"])
    try:
        gw.wait_healthy()
        yield gw
    finally:
        gw.stop()


def _client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="none", max_retries=0, timeout=120)


@torch.inference_mode()
def _transformers(path: str, img, **kw) -> list[int]:
    model, processor = oracle_model(path)
    text = chat_prompt(path, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}])
    inputs = processor(text=text, images=[img], return_tensors="pt", add_special_tokens=False, **kw)
    return model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()


def _messages(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


@pytest.mark.parametrize("seed, small_first", [(901, True), (902, False)])
def test_max_pixels_per_request_matches_transformers_in_both_orders(gateway, qwen2_vl_dir, seed, small_first):
    """The same image at two sizes, one after the other on one cache: two entries, each answer transformers'."""
    img, url = _png(seed)
    want = {True: _transformers(qwen2_vl_dir, img, max_pixels=SMALL), False: _transformers(qwen2_vl_dir, img)}
    c = _client(gateway)
    lengths = {}
    for small in (small_first, not small_first):
        extra = {"mm_processor_kwargs": {"max_pixels": SMALL}, "return_token_ids": True} if small else \
            {"return_token_ids": True}
        r = c.chat.completions.create(model="tiny", messages=_messages(url), max_tokens=6, temperature=0,
                                      extra_body={**extra, "ignore_eos": True})
        assert r.choices[0].token_ids == want[small], small
        lengths[small] = r.usage.prompt_tokens
    assert lengths[True] < lengths[False]  # the small image really had fewer placeholder tokens


def test_public_grpc_client_carries_mm_processor_kwargs(gateway, qwen2_vl_dir):
    from mmpipe.client import MMPipeClient

    img, url = _png(903)
    with MMPipeClient(gateway.grpc_addr) as c:
        r = c.chat(_messages(url), max_tokens=6, temperature=0, ignore_eos=True,
                   mm_processor_kwargs={"max_pixels": SMALL})
    assert r.token_ids == _transformers(qwen2_vl_dir, img, max_pixels=SMALL)


@pytest.mark.parametrize("extra, param", [
    ({"mm_processor_kwargs": {"max_pixels": 112 * 112 + 28}}, "mm_processor_kwargs.max_pixels"),  # above the ceiling
    ({"mm_processor_kwargs": {"do_normalize": False}}, "mm_processor_kwargs.do_normalize"),  # not on the allow-list
    ({"mm_processor_kwargs": {"num_frames": 4, "fps": 1}}, "mm_processor_kwargs.num_frames"),
    ({"media_io_kwargs": {"video": {"frames": 4}}}, "media_io_kwargs.video"),
])
def test_bad_settings_are_a_400_naming_the_key_and_the_server_keeps_serving(gateway, extra, param):
    c = _client(gateway)
    _, url = _png(904)
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="tiny", messages=_messages(url), max_tokens=2, extra_body=extra)
    assert ei.value.status_code == 400 and ei.value.body.get("param") == param, ei.value.body
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_stages_check_the_settings_themselves(stage_stack):
    """A caller other than the gateway gets the same rule from ingest (INVALID_ARGUMENT naming the key)."""
    import asyncio

    from mmpipe.services.common.convert import MediaSource
    from mmpipe.services.common.stage_clients import StageClients
    from mmpipe.shared.errors import InvalidInputError

    _, url = _png(905)

    async def go():
        clients = StageClients.connect(ingest=stage_stack.ingest_addr, encoder=stage_stack.encoder_addr,
                                       generator=stage_stack.generator_addr)
        try:
            await clients.ingest.ingest([MediaSource("image", url=url)], mm_processor_kwargs={"max_pixels": 10 ** 7})
        finally:
            await clients.close()

    with pytest.raises(InvalidInputError) as ei:
        asyncio.run(go())
    assert ei.value.param == "mm_processor_kwargs.max_pixels"


def test_audio_embeds_part_is_a_400_for_a_family_without_audio(gateway):
    c = _client(gateway)
    buf = io.BytesIO()
    torch.save(torch.zeros(3, 64), buf)
    part = {"type": "audio_embeds", "audio_embeds": base64.b64encode(buf.getvalue()).decode()}
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [part]}], max_tokens=2)
    assert ei.value.status_code == 400 and "audio" in ei.value.body.get("message", ""), ei.value.body
