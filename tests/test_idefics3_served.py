"""Idefics3 and SmolVLM served: the real ingest, encoder, generator and gateway processes on free 127.0.0.1 ports
with a real Redis, asked through the official `openai` client, one stack per family. The items' expansions (tile
grid, row/column markers, global image) ride the encoder -> generator hop in the embedding cache's metadata;
greedy tokens must equal transformers' `model.generate(**processor(...))`, and `image_embeds` is a 400 naming the
field."""
from __future__ import annotations

import base64
import io

import openai
import pytest
import torch
from services_helpers import served_stack

from mmpipe.shared.media.embeds import encode_tensor_b64
from offline_helpers import chat_prompt, hf_generate, make_image

KEY = "sk-idefics3"
GREEDY = dict(temperature=0.0, max_tokens=8)
EXTRA = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def served(request, redis_server):
    from mmpipe.shared.models.tiny import ensure_tiny_model

    model = str(ensure_tiny_model(request.param))
    with served_stack(model, redis_server, ["--redis-url", redis_server, "--api-key", KEY, "--enable-mm-embeds",
                                            "--shutdown-grace-s", "5"], encoder_args=["--enable-mm-embeds"]) as (_, gw):
        yield model, openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)


def _png_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(client, images, text: str):
    parts = [{"type": "image_url", "image_url": {"url": _png_url(img)}} for img in images]
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts + [
        {"type": "text", "text": text}]}], **GREEDY, extra_body=EXTRA)


def _ref(model: str, images, text: str) -> list[int]:
    tpl = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
    return hf_generate(model, chat_prompt(model, tpl), images=images, add_special_tokens=False)


def test_images_match_transformers_and_image_embeds_is_a_400(served):
    model, client = served
    # 112x84 -> 2x2 tiles + the global image; 112x56 -> 1x2 + global: different grids in one prompt
    one, two = [make_image(112, 84, seed=41)], [make_image(112, 56, seed=42), make_image(112, 84, seed=43)]
    text = "What is in this picture?"
    assert _ask(client, one, text).choices[0].token_ids == _ref(model, one, text)
    assert _ask(client, two, text).choices[0].token_ids == _ref(model, two, text)
    bad = [{"type": "image_embeds", "image_embeds": encode_tensor_b64(torch.zeros(20, 64))},
           {"type": "text", "text": text}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": bad}], **GREEDY,
                                       extra_body=EXTRA)
    assert e.value.status_code == 400 and e.value.body["param"] == "image_embeds"
