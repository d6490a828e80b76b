"""Qwen3-VL (dense and MoE) served: the real ingest, encoder, generator and gateway processes on free 127.0.0.1 ports with a real
Redis, asked through the official `openai` client. The DeepStack features ride the encoder -> generator hop in
the embedding cache (one row = base embedding + deepstack features); greedy tokens must equal transformers'
`model.generate(**processor(...))`, and a malformed `image_embeds` is a 400 naming the field."""
from __future__ import annotations

import base64
import io

import openai
import pytest
import torch
from services_helpers import served_stack

from mmpipe.shared.media.embeds import encode_tensor_b64
from offline_helpers import chat_prompt, hf_generate, make_image, make_video, oracle_model, write_mp4

KEY = "sk-qwen3-vl"
GREEDY = dict(temperature=0.0, max_tokens=8)
EXTRA = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_vl_moe"])
def served(request, redis_server, tmp_path_factory):
    """One stack per family, the dense one and the sparse-MoE one (one at a time: module-scoped params)."""
    from mmpipe.shared.models.tiny import ensure_tiny_model

    model = str(ensure_tiny_model(request.param))
    media = tmp_path_factory.mktemp("q3-media")
    with served_stack(model, redis_server, ["--redis-url", redis_server, "--api-key", KEY, "--enable-mm-embeds",
                                            "--allowed-local-media-path", str(media), "--shutdown-grace-s", "5"],
                      encoder_args=["--enable-mm-embeds"], ingest_args=["--allowed-local-media-path", str(media)]
                      ) as (_, gw):
        yield model, media, openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)


def _png_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _embeds(model: str, img) -> dict:
    """transformers' own features of `img` in vLLM's Qwen3-VL layout (base + deepstack along the hidden dim)."""
    hf, processor = oracle_model(model)
    inp = processor(text="<|image_pad|>", images=[img], return_tensors="pt")
    with torch.inference_mode():
        o = hf.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
    rows = torch.cat([o.pooler_output[0], *(layer[0] for layer in o.deepstack_features)], dim=-1)
    return {"image_embeds": rows, "image_grid_thw": inp["image_grid_thw"].tolist()}


def test_image_video_and_image_embeds_match_transformers(served):
    from mmpipe.shared.media.loader import MediaLoader
    from mmpipe.shared.media.policy import MediaPolicy

    model, media, client = served
    img, other = make_image(112, 84, seed=21), make_image(64, 96, seed=22)
    mp4 = write_mp4(media / "clip.mp4", make_video(n=4, h=64, w=96, seed=23))
    emb = _embeds(model, other)
    parts = [{"type": "image_url", "image_url": {"url": _png_url(img)}},
             {"type": "video_url", "video_url": {"url": f"file://{mp4}"}},
             {"type": "image_embeds", "image_embeds": {"image_embeds": encode_tensor_b64(emb["image_embeds"]),
                                                        "image_grid_thw": emb["image_grid_thw"]}},
             {"type": "text", "text": "Describe them."}]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], **GREEDY,
                                       extra_body=EXTRA)
    tpl = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "image"},
                                        {"type": "text", "text": "Describe them."}]}]
    # the oracle gets the frames as decoded (h264 is lossy; decoding is the loader's job, tested apart)
    frames = MediaLoader(MediaPolicy(allowed_local_media_path=str(media))).load("video", f"file://{mp4}").data
    # ... and the clip's timing (4 frames at 4 fps): the frame timestamps in the prompt follow it
    timing = {"video_metadata": [{"fps": 4.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}]}
    ref = hf_generate(model, chat_prompt(model, tpl), images=[img, other], videos=[frames], add_special_tokens=False,
                      **timing)
    assert r.choices[0].token_ids == ref


def test_image_embeds_without_deepstack_is_a_400_and_serving_goes_on(served):
    model, _, client = served
    img = make_image(64, 64, seed=24)
    emb = _embeds(model, img)
    base = emb["image_embeds"][:, :emb["image_embeds"].shape[1] // 3]
    bad = [{"type": "image_embeds", "image_embeds": {"image_embeds": encode_tensor_b64(base),
                                                      "image_grid_thw": emb["image_grid_thw"]}},
           {"type": "text", "text": "What is it?"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": bad}], **GREEDY,
                                       extra_body=EXTRA)
    assert e.value.status_code == 400 and e.value.body["param"] == "image_embeds"
    assert "deepstack" in e.value.body["message"]
    ok = [{"type": "image_url", "image_url": {"url": _png_url(img)}}, {"type": "text", "text": "What is it?"}]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": ok}], **GREEDY,
                                       extra_body=EXTRA)
    tpl = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert r.choices[0].token_ids == hf_generate(model, chat_prompt(model, tpl), images=[img],
                                                 add_special_tokens=False)
