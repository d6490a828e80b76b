"""LLaVA-NeXT and InternVL served: the real ingest, encoder, generator and gateway processes on free 127.0.0.1
ports with a real Redis, one stack per family, asked through the official `openai` client. The tiles, their
unpadding / pixel shuffle and the image-size-dependent row counts are the encoder's; the generator expands the
placeholders (InternVL's `<img>` ... `</img>` too). Greedy tokens must equal transformers'
`model.generate(**processor(...))` for one image, two images of different sizes, precomputed `image_embeds`, and
(InternVL) a video beside an image."""
from __future__ import annotations

import base64
import io

import openai
import pytest
import torch
from services_helpers import served_stack

from mmpipe.shared.media.embeds import encode_tensor_b64
from offline_helpers import chat_prompt, hf_generate, make_image, make_video, oracle_model, write_mp4

KEY = "sk-tiled"
GREEDY = dict(temperature=0.0, max_tokens=8)
EXTRA = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module", params=["llava_next", "internvl"])
def served(request, redis_server, tmp_path_factory):
    from mmpipe.shared.models.tiny import ensure_tiny_model

    family = request.param
    model = str(ensure_tiny_model(family))
    media = tmp_path_factory.mktemp(f"{family}-media")
    with served_stack(model, redis_server, ["--redis-url", redis_server, "--api-key", KEY, "--enable-mm-embeds",
                                            "--allowed-local-media-path", str(media), "--shutdown-grace-s", "5"],
                      encoder_args=["--enable-mm-embeds"], ingest_args=["--allowed-local-media-path", str(media)]
                      ) as (_, gw):
        yield family, model, media, openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)


def _png_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(client, parts: list[dict]) -> list[int]:
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], **GREEDY,
                                       extra_body=EXTRA)
    return r.choices[0].token_ids


def _ref(model: str, images: list, text: str) -> list[int]:
    tpl = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
    return hf_generate(model, chat_prompt(model, tpl), images=images, add_special_tokens=False)


def test_one_image_and_two_images_of_different_sizes_match_transformers(served):
    _, model, _, client = served
    one = make_image(112, 84, seed=31)
    two = [make_image(56, 112, seed=32), make_image(64, 48, seed=33)]
    text = "Describe them."
    assert _ask(client, [{"type": "image_url", "image_url": {"url": _png_url(one)}},
                         {"type": "text", "text": text}]) == _ref(model, [one], text)
    parts = [{"type": "image_url", "image_url": {"url": _png_url(im)}} for im in two]
    assert _ask(client, parts + [{"type": "text", "text": text}]) == _ref(model, two, text)


def test_image_embeds_match_transformers(served):
    family, model, _, client = served
    img = make_image(112, 84, seed=34)
    hf, processor = oracle_model(model)
    inp = processor(text=processor.image_token, images=[img], return_tensors="pt")
    with torch.inference_mode():
        if family == "llava_next":
            rows = hf.get_image_features(pixel_values=inp["pixel_values"],
                                         image_sizes=inp["image_sizes"]).pooler_output[0]
        else:
            rows = hf.get_image_features(pixel_values=inp["pixel_values"]).pooler_output.flatten(0, 1)
    text = "What is it?"
    got = _ask(client, [{"type": "image_embeds", "image_embeds": encode_tensor_b64(rows)},
                        {"type": "text", "text": text}])
    assert got == _ref(model, [img], text)


def test_internvl_video_and_image_match_transformers(served):
    from mmpipe.shared.media.loader import MediaLoader
    from mmpipe.shared.media.policy import MediaPolicy

    family, model, media, client = served
    if family != "internvl":
        pytest.skip("LLaVA-NeXT takes images only")
    img = make_image(64, 48, seed=35)
    mp4 = write_mp4(media / "clip.mp4", make_video(n=4, h=64, w=96, seed=36))
    text = "Describe them."
    got = _ask(client, [{"type": "video_url", "video_url": {"url": f"file://{mp4}"}},
                        {"type": "image_url", "image_url": {"url": _png_url(img)}}, {"type": "text", "text": text}])
    # the oracle gets the frames as decoded (h264 is lossy; decoding is the loader's job, tested apart)
    frames = MediaLoader(MediaPolicy(allowed_local_media_path=str(media))).load("video", f"file://{mp4}").data
    tpl = [{"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": text}]}]
    assert got == hf_generate(model, chat_prompt(model, tpl), images=[img], videos=[frames], add_special_tokens=False)
