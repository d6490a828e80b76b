"""vLLM's multimodal input rules on the offline API: UUIDs and the cache, limits, embeds, RGBA, bad input.

Every bad input raises a clear error before any model work, and the same LLM then serves the next prompt.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmpipe import LLM, SamplingParams
from mmpipe.shared.errors import (InvalidInputError, LimitExceededError, MediaDecodeError, MediaPolicyError,
                                  NotCachedError, UnsupportedError)
from offline_helpers import (  # noqa: F401 (tiny_model_dirs is a fixture)
    ENGINE, hf_generate, make_image, png_bytes, tiny_model_dirs,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen(tiny_model_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("allowed")
    return LLM(str(tiny_model_dirs["qwen2_vl"]), device="cpu", engine=ENGINE, enable_mm_embeds=True,
               limit_mm_per_prompt={"image": 2, "video": 1}, allowed_local_media_path=str(folder))


def _prompt(llm, n_images=1, text="Look"):
    return f"{text} " + " ".join([llm.adapter.placeholder_token("image")] * n_images)


def _ok(llm, seed=40):
    img = make_image(seed=seed)
    out = llm.generate({"prompt": _prompt(llm), "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False)
    return out[0].outputs[0].token_ids


def test_uuid_hit_skips_decode_and_encode(qwen, tiny_model_dirs):
    img = make_image(seed=21)
    p = _prompt(qwen)
    first = qwen.generate({"prompt": p, "multi_modal_data": {"image": [img]},
                           "multi_modal_uuids": {"image": ["cat-21"]}}, GREEDY, use_tqdm=False)[0]
    before = qwen.stats
    again = qwen.generate({"prompt": p, "multi_modal_data": {"image": [None]},
                           "multi_modal_uuids": {"image": ["cat-21"]}}, GREEDY, use_tqdm=False)[0]
    after = qwen.stats
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == hf_generate(
        tiny_model_dirs["qwen2_vl"], p, images=[img], max_new_tokens=6)
    assert after["media_loaded"] == before["media_loaded"]
    assert after["items_encoded"] == before["items_encoded"]
    assert after["cache_hits"] == before["cache_hits"] + 1


def test_same_content_hits_by_hash(qwen):
    img = make_image(seed=22)
    p = _prompt(qwen)
    a = qwen.generate({"prompt": p, "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False)[0]
    enc = qwen.stats["items_encoded"]
    b = qwen.generate({"prompt": p, "multi_modal_data": {"image": img.copy()}}, GREEDY, use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert qwen.stats["items_encoded"] == enc


def test_uuid_miss_is_a_clear_error(qwen):
    with pytest.raises(NotCachedError, match="never-seen"):
        qwen.generate({"prompt": _prompt(qwen), "multi_modal_data": {"image": [None]},
                       "multi_modal_uuids": {"image": ["never-seen"]}}, GREEDY, use_tqdm=False)
    assert _ok(qwen)


def test_none_uuid_falls_back_to_hash(qwen):
    img = make_image(seed=23)
    p = _prompt(qwen, 2)
    out = qwen.generate({"prompt": p, "multi_modal_data": {"image": [img, img]},
                         "multi_modal_uuids": {"image": ["u-23", None]}}, GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 6


@pytest.mark.parametrize("bad, exc, words", [
    ({"multi_modal_data": {"image": [1, 2]}, "multi_modal_uuids": {"image": ["a"]}}, InvalidInputError, "1 entries"),
    ({"multi_modal_data": {"image": [1]}, "multi_modal_uuids": {"video": ["a"]}}, InvalidInputError, "'image' is missing"),
    ({"multi_modal_data": {"smell": [1]}}, InvalidInputError, "unknown modality 'smell'"),
    ({"multi_modal_data": {"audio": [(np.zeros(10), 16000)]}}, UnsupportedError, "does not take audio"),
    ({"multi_modal_data": {"image": [None]}}, InvalidInputError, "no uuid"),
])
def test_bad_multi_modal_arguments(qwen, bad, exc, words):
    with pytest.raises(exc, match=words):
        qwen.generate({"prompt": _prompt(qwen), **bad}, GREEDY, use_tqdm=False)
    assert _ok(qwen)


def test_too_many_items_fails_before_work(qwen):
    before = qwen.stats
    imgs = [make_image(seed=s) for s in range(3)]
    with pytest.raises(LimitExceededError, match="at most 2"):
        qwen.generate({"prompt": _prompt(qwen, 3), "multi_modal_data": {"image": imgs}}, GREEDY, use_tqdm=False)
    assert qwen.stats["media_loaded"] == before["media_loaded"]
    msgs = [{"role": "user", "content": [{"type": "image_pil", "image_pil": i} for i in imgs]}]
    with pytest.raises(LimitExceededError):
        qwen.chat(msgs, GREEDY, use_tqdm=False)


def test_placeholder_count_mismatch(qwen):
    with pytest.raises(InvalidInputError, match="placeholder"):
        qwen.generate({"prompt": _prompt(qwen, 2), "multi_modal_data": {"image": make_image()}}, GREEDY,
                      use_tqdm=False)
    assert _ok(qwen)


def test_truncated_media_and_policy(qwen, tmp_path):
    data = png_bytes(make_image(seed=3))
    with pytest.raises(MediaDecodeError):
        qwen.generate({"prompt": _prompt(qwen), "multi_modal_data": {"image": data[: len(data) // 2]}}, GREEDY,
                      use_tqdm=False)
    outside = tmp_path / "x.png"
    outside.write_bytes(data)
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{outside}"}}]}]
    with pytest.raises(MediaPolicyError):
        qwen.chat(msgs, GREEDY, use_tqdm=False)
    assert _ok(qwen)


def test_bad_embeddings(qwen):
    hidden = qwen.adapter.hidden_size
    with pytest.raises(InvalidInputError, match="hidden size"):
        qwen.generate({"prompt": _prompt(qwen), "multi_modal_data": {
            "image": {"image_embeds": torch.zeros(12, hidden + 1), "image_grid_thw": torch.tensor([[1, 6, 8]])}}},
            GREEDY, use_tqdm=False)
    with pytest.raises(InvalidInputError, match="needs 12 rows"):
        qwen.generate({"prompt": _prompt(qwen), "multi_modal_data": {
            "image": {"image_embeds": torch.zeros(10, hidden), "image_grid_thw": torch.tensor([[1, 6, 8]])}}},
            GREEDY, use_tqdm=False)
    with pytest.raises(InvalidInputError, match="grid_thw"):
        qwen.generate({"prompt": _prompt(qwen), "multi_modal_data": {"image": torch.zeros(1, 12, hidden)}},
                      GREEDY, use_tqdm=False)
    assert _ok(qwen)


def test_embeds_need_the_switch(tiny_model_dirs):
    llm = LLM(str(tiny_model_dirs["llava"]), device="cpu", engine=ENGINE)
    with pytest.raises(UnsupportedError, match="enable_mm_embeds"):
        llm.generate({"prompt": _prompt(llm), "multi_modal_data": {"image": torch.zeros(1, 16, 64)}}, GREEDY,
                     use_tqdm=False)


def test_cache_off_ignores_uuids_and_refuses_none(tiny_model_dirs):
    llm = LLM(str(tiny_model_dirs["llava"]), device="cpu", engine=ENGINE, mm_cache=None)
    img = make_image(seed=31)
    p = _prompt(llm)
    for _ in range(2):
        llm.generate({"prompt": p, "multi_modal_data": {"image": [img]}, "multi_modal_uuids": {"image": ["x"]}},
                     GREEDY, use_tqdm=False)
    assert llm.stats["items_encoded"] == 2
    with pytest.raises(InvalidInputError, match="cache is disabled"):
        llm.generate({"prompt": p, "multi_modal_data": {"image": [None]}, "multi_modal_uuids": {"image": ["x"]}},
                     GREEDY, use_tqdm=False)


def test_rgba_background(tiny_model_dirs):
    path = tiny_model_dirs["llava"]
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, 32:, 3] = 255  # left half fully transparent, right half opaque grey
    img = Image.fromarray(rgba, "RGBA")
    llm = LLM(str(path), device="cpu", engine=ENGINE, media_io_kwargs={"image": {"rgba_background_color": [0, 128, 255]}})
    loaded = llm.resolver.loader.load("image", img).data
    px = np.asarray(loaded)
    assert loaded.mode == "RGB"
    assert (px[:, :32] == [0, 128, 255]).all() and (px[:, 32:] == 200).all()
    expected = np.where(rgba[..., 3:] == 255, rgba[..., :3], np.array([0, 128, 255], dtype=np.uint8))
    p = _prompt(llm)
    out = llm.generate({"prompt": p, "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_generate(path, p, images=[Image.fromarray(expected.astype(np.uint8))],
                                                   max_new_tokens=6)
    rgb = make_image(seed=32)
    assert np.array_equal(np.asarray(llm.resolver.loader.load("image", rgb).data), np.asarray(rgb))
    for bad in ([1, 2], [0, 0, 256], "red"):
        with pytest.raises(InvalidInputError, match="rgba_background_color"):
            LLM(str(path), device="cpu", engine=ENGINE, media_io_kwargs={"image": {"rgba_background_color": bad}})


def test_chat_template_fallback_and_override(tiny_model_dirs):
    from mmpipe.shared.chat.templates import FALLBACK_TEMPLATES

    llm = LLM(str(tiny_model_dirs["qwen2_vl"]), device="cpu", engine=ENGINE)
    llm.adapter.processor.chat_template = None
    llm.tokenizer.chat_template = None
    msgs = [{"role": "user", "content": "hello"}]
    out = llm.chat(msgs, GREEDY, use_tqdm=False)[0]
    assert out.prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    custom = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert llm.chat(msgs, GREEDY, use_tqdm=False, chat_template=custom)[0].prompt == "[hello]"
    assert "qwen2_vl" in FALLBACK_TEMPLATES


def test_stop_strings_and_text(tiny_model_dirs):
    llm = LLM(str(tiny_model_dirs["llava"]), device="cpu", engine=ENGINE)
    full = llm.generate("USER: hello ASSISTANT:", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    text = full.text
    assert text == llm.tokenizer.decode(full.token_ids, skip_special_tokens=True)
    if len(text) > 4:
        stop = text[2:4]
        cut = llm.generate("USER: hello ASSISTANT:", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                                     stop=[stop]), use_tqdm=False)[0].outputs[0]
        assert cut.finish_reason == "stop"
        assert cut.text == text[: text.index(stop)]
