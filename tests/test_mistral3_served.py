"""Mistral 3 / Pixtral served: the real ingest, encoder, generator and gateway processes on free 127.0.0.1 ports
with a real Redis, asked through the official `openai` client. Each image's expansion (its own grid of [IMG]
rows with [IMG_BREAK] / [IMG_END]) rides the encoder -> generator hop in the embedding's metadata; greedy
tokens must equal transformers' `model.generate(**processor(...))`, and `image_embeds` is a 400 naming it."""
from __future__ import annotations

import base64
import io

import openai
import pytest
import torch
from services_helpers import served_stack

from mmpipe.shared.media.embeds import encode_tensor_b64
from offline_helpers import chat_prompt, hf_generate, make_image

KEY = "sk-mistral3"
GREEDY = dict(temperature=0.0, max_tokens=8)
EXTRA = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def served(redis_server):
    from mmpipe.shared.models.tiny import ensure_tiny_model

    model = str(ensure_tiny_model("mistral3"))
    with served_stack(model, redis_server, ["--redis-url", redis_server, "--api-key", KEY, "--enable-mm-embeds",
                                            "--shutdown-grace-s", "5"], encoder_args=["--enable-mm-embeds"]) as (_, gw):
        yield model, openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)


def _png_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(client, images, text: str):
    parts = [{"type": "image_url", "image_url": {"url": _png_url(i)}} for i in images]
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts + [
        {"type": "text", "text": text}]}], **GREEDY, extra_body=EXTRA)


def _ref(model: str, images, text: str) -> list[int]:
    tpl = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
    return hf_generate(model, chat_prompt(model, tpl), images=images, add_special_tokens=False)


def test_one_image_and_two_of_different_sizes_match_transformers(served):
    model, client = served
    one = [make_image(112, 84, seed=31)]
    two = [make_image(84, 112, seed=32), make_image(40, 24, seed=33)]  # grids of 3 x 4 and 3 x 2 tokens
    text = "Describe the picture. What is in it, and where?"
    r1, r2 = _ask(client, one, text), _ask(client, two, text)
    assert r1.choices[0].token_ids == _ref(model, one, text)
    assert r2.choices[0].token_ids == _ref(model, two, text)
    assert r1.choices[0].token_ids != r2.choices[0].token_ids


def test_image_embeds_is_a_400_naming_it(served):
    _, client = served
    bad = [{"type": "image_embeds", "image_embeds": encode_tensor_b64(torch.zeros(4, 64))},
           {"type": "text", "text": "What is it?"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": bad}], **GREEDY,
                                       extra_body=EXTRA)
    assert e.value.status_code == 400 and e.value.body["param"] == "image_embeds"
    assert "pixels only" in e.value.body["message"]  # the family's refusal, not a generic one
