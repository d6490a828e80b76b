"""Voxtral served: the real ingest, encoder, generator and gateway processes on free 127.0.0.1 ports with a real
Redis, asked through the official `openai` client with `input_audio` parts. Every stage reads the checkpoint's HF
tokenizer files; greedy tokens must equal transformers' `model.generate(**processor.apply_chat_template(...))`
(mistral-common's encoding of the same clips), and `audio_embeds` is a 400 naming it."""
from __future__ import annotations

import openai
import pytest
import torch
from services_helpers import served_stack

from mmpipe.shared.media.embeds import encode_tensor_b64
from offline_helpers import hf_chat_generate, wav_b64
from test_voxtral import clip

KEY = "sk-voxtral"
GREEDY = dict(temperature=0.0, max_tokens=8)
EXTRA = {"ignore_eos": True, "return_token_ids": True}
TEXT = "What's that sound? Describe it."


@pytest.fixture(scope="module")
def served(redis_server):
    from mmpipe.shared.models.tiny import ensure_tiny_model

    model = str(ensure_tiny_model("voxtral"))
    with served_stack(model, redis_server, ["--redis-url", redis_server, "--api-key", KEY, "--enable-mm-embeds",
                                            "--shutdown-grace-s", "5"], encoder_args=["--enable-mm-embeds"]) as (_, gw):
        yield model, openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)


def _ask(client, clips):
    parts = [{"type": "input_audio", "input_audio": {"data": wav_b64(a), "format": "wav"}} for a in clips]
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts + [
        {"type": "text", "text": TEXT}]}], **GREEDY, extra_body=EXTRA)


def test_one_clip_and_two_of_different_lengths_match_transformers(served):
    model, client = served
    one = [clip(6.0, 440, 11)]
    two = [clip(3.0, 900, 12), clip(33.0, 250, 13)]  # one chunk and two
    r1, r2 = _ask(client, one), _ask(client, two)
    assert r1.choices[0].token_ids == hf_chat_generate(model, [*one, TEXT])
    assert r2.choices[0].token_ids == hf_chat_generate(model, [*two, TEXT])


def test_audio_embeds_is_a_400_naming_it(served):
    _, client = served
    bad = [{"type": "audio_embeds", "audio_embeds": encode_tensor_b64(torch.zeros(4, 64))},
           {"type": "text", "text": "What is it?"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": bad}], **GREEDY,
                                       extra_body=EXTRA)
    assert e.value.status_code == 400 and e.value.body["param"] == "audio_embeds"
    assert "waveforms only" in e.value.body["message"]  # the family's refusal, not a generic one
