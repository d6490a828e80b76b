"""Per-request media settings: `mm_processor_kwargs` (the family's allow-list, the server's ceilings), the cache
keyspace of the effective settings, and video timing (Qwen2.5-VL's `second_per_grid_ts` from the clip's fps).

Offline (`LLM.generate` per prompt, `LLM.chat(mm_processor_kwargs=...)`) against transformers' own
`model.generate(**processor(...))` on the tiny random models; the served path is tests/test_mm_kwargs_served.py.
"""
from __future__ import annotations

import pytest
import torch

from mmpipe import LLM, SamplingParams
from mmpipe.shared.errors import InvalidInputError
from offline_helpers import (  # noqa: F401 (tiny_model_dirs is a fixture)
    ENGINE, chat_prompt, make_image, make_video, oracle_model, tiny_model_dirs, write_mp4,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
SMALL = 56 * 84  # below the tiny Qwen processors' longest_edge (112 * 112): fewer image tokens


@pytest.fixture(scope="module")
def vl(tiny_model_dirs, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    return LLM(str(tiny_model_dirs["qwen2_5_vl"]), device="cpu", engine=ENGINE, allowed_local_media_path=str(media)), \
        media


@torch.inference_mode()
def _hf(path, text: str, **kw) -> tuple[list[int], dict]:
    model, processor = oracle_model(str(path))
    inputs = processor(text=text, return_tensors="pt", add_special_tokens=False, **kw)
    out = model.generate(**inputs, max_new_tokens=GREEDY.max_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), inputs


def test_generate_per_prompt_max_pixels_matches_transformers_in_both_orders(vl, tiny_model_dirs):
    llm, _ = vl
    path = tiny_model_dirs["qwen2_5_vl"]
    img = make_image(seed=11)
    ph = llm.adapter.placeholder_token("image")
    text = f"<|vision_start|>{ph}<|vision_end|>Describe the image."
    small = {"prompt": text, "multi_modal_data": {"image": img}, "mm_processor_kwargs": {"max_pixels": SMALL}}
    plain = {"prompt": text, "multi_modal_data": {"image": img}}
    want_small, in_small = _hf(path, text, images=[img], max_pixels=SMALL)
    want_plain, in_plain = _hf(path, text, images=[img])
    assert in_small["input_ids"].shape[1] < in_plain["input_ids"].shape[1]  # the setting changed the tokens
    for order in ([small, plain], [plain, small]):  # both orders, one warm cache: no entry is shared
        before = llm.stats["items_encoded"]
        outs = llm.generate(order, GREEDY, use_tqdm=False)
        got = {len(o.prompt_token_ids): o.outputs[0].token_ids for o in outs}
        assert got == {in_small["input_ids"].shape[1]: want_small, in_plain["input_ids"].shape[1]: want_plain}
        assert llm.stats["items_encoded"] - before == (2 if order[0] is small else 0)  # 2nd order: both cached
    ks = llm.settings
    assert ks.keyspace(ks.resolve({"max_pixels": SMALL})).prefix != ks.keyspace().prefix
    assert ks.keyspace(ks.resolve({})).prefix == ks.keyspace().prefix  # no setting: the server's entries


def test_chat_mm_processor_kwargs_match_transformers(vl, tiny_model_dirs):
    llm, _ = vl
    path = tiny_model_dirs["qwen2_5_vl"]
    img = make_image(seed=12)
    msgs = [{"role": "user", "content": [{"type": "image_pil", "image_pil": img},
                                         {"type": "text", "text": "What is it?"}]}]
    out = llm.chat(msgs, GREEDY, use_tqdm=False, mm_processor_kwargs={"max_pixels": SMALL, "min_pixels": 784})[0]
    prompt = chat_prompt(path, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}])
    want, inputs = _hf(path, prompt, images=[img], max_pixels=SMALL, min_pixels=784)
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist() and out.outputs[0].token_ids == want


def test_chat_media_io_kwargs_per_call(vl, tiny_model_dirs):
    """A chat's own media_io_kwargs over the LLM's: an RGBA image composited over black instead of white gives
    transformers' tokens for the black-composited image, under a keyspace of its own."""
    import numpy as np
    from PIL import Image

    llm, _ = vl
    path = tiny_model_dirs["qwen2_5_vl"]
    rgba = np.random.default_rng(13).integers(0, 255, (84, 112, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(112)[None, :] < 56, 0, 255)  # the left half transparent
    img = Image.fromarray(rgba, "RGBA")
    black = Image.new("RGB", img.size, (0, 0, 0))
    black.paste(img, mask=img.split()[3])
    msgs = [{"role": "user", "content": [{"type": "image_pil", "image_pil": img}, {"type": "text", "text": "Hi"}]}]
    io = {"image": {"rgba_background_color": [0, 0, 0]}}
    out = llm.chat(msgs, GREEDY, use_tqdm=False, media_io_kwargs=io)[0]
    prompt = chat_prompt(path, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
    assert out.outputs[0].token_ids == _hf(path, prompt, images=[black])[0]
    assert llm.settings.keyspace(llm.settings.resolve(None, io)).prefix != llm.settings.keyspace().prefix
    with pytest.raises(InvalidInputError) as ei:
        llm.chat(msgs, GREEDY, use_tqdm=False, media_io_kwargs={"image": {"background": 1}})
    assert ei.value.param == "media_io_kwargs.image"


@pytest.mark.parametrize(("kw", "param"), [
    ({"max_pixels": 112 * 112 + 1}, "mm_processor_kwargs.max_pixels"),  # above the server's ceiling
    ({"min_pixels": 10 ** 6}, "mm_processor_kwargs.min_pixels"),
    ({"do_rescale": False}, "mm_processor_kwargs.do_rescale"),  # not on the allow-list
    ({"max_pixels": "big"}, "mm_processor_kwargs.max_pixels"),
    ({"max_pixels": 0}, "mm_processor_kwargs.max_pixels"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "mm_processor_kwargs.min_pixels"),
    ({"fps": 2, "num_frames": 4}, "mm_processor_kwargs.fps"),
    ({"num_frames": 10 ** 4}, "mm_processor_kwargs.num_frames"),
])
def test_bad_kwargs_are_refused_naming_the_key(vl, kw, param):
    llm, _ = vl
    with pytest.raises(InvalidInputError) as ei:
        llm.generate({"prompt": "hi", "mm_processor_kwargs": kw}, GREEDY, use_tqdm=False)
    assert ei.value.param == param and ei.value.http_status == 400
    with pytest.raises(InvalidInputError) as ei:
        llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False, mm_processor_kwargs=kw)
    assert ei.value.param == param


def test_a_server_ceiling_from_the_flag_and_a_family_without_an_allow_list(tiny_model_dirs):
    from mmpipe.shared.models.registry import adapter_class_for
    from transformers import AutoProcessor

    cls = adapter_class_for("qwen2_vl")
    proc = AutoProcessor.from_pretrained(tiny_model_dirs["qwen2_vl"])
    assert cls.resolve_request_mm_kwargs(proc, {"max_pixels": 5000}, {"max_pixels": 4000}) == {"max_pixels": 4000}
    with pytest.raises(InvalidInputError, match="above this server's max_pixels"):
        cls.resolve_request_mm_kwargs(proc, {"max_pixels": 5000}, {"max_pixels": 6000})
    llava = adapter_class_for("llava")
    with pytest.raises(InvalidInputError, match="takes none per request") as ei:
        llava.resolve_request_mm_kwargs(AutoProcessor.from_pretrained(tiny_model_dirs["llava"]), {}, {"max_pixels": 1})
    assert ei.value.param == "mm_processor_kwargs.max_pixels"


@pytest.mark.parametrize("sampling", [None, {"fps": 1.5}, {"num_frames": 2}])
def test_video_timing_is_transformers_from_a_clip_of_known_fps(vl, tiny_model_dirs, sampling):
    """A 6-frame clip at 3 fps (not transformers' default 24): second_per_grid_ts = temporal_patch / sampled fps,
    the processor's own frame sampling for fps / num_frames, and greedy tokens identical to transformers."""
    llm, media = vl
    path = tiny_model_dirs["qwen2_5_vl"]
    mp4 = write_mp4(media / "clip3.mp4", make_video(n=6, h=56, w=84, seed=5), fps=3)
    frames = llm.resolver.loader.load("video", f"file://{mp4}").data  # as decoded (h264 is lossy)
    ph = llm.adapter.placeholder_token("video")
    text = f"<|vision_start|>{ph}<|vision_end|>Describe the video."
    meta = [{"fps": 3.0, "total_num_frames": 6, "frames_indices": list(range(6))}]
    extra = {**(sampling or {}), **({"do_sample_frames": True} if sampling else {})}
    want, inputs = _hf(path, text, videos=[frames], video_metadata=meta, **extra)
    prompt = {"prompt": text, "multi_modal_data": {"video": f"file://{mp4}"}}
    if sampling:
        prompt["mm_processor_kwargs"] = sampling
    out = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist() and out.outputs[0].token_ids == want
    settings = llm.settings.resolve(sampling)
    item = llm.resolver.load(llm_ref(f"file://{mp4}"), settings)
    emb = llm.adapter.encode("video", [llm.adapter.preprocess(item, settings.mm_processor_kwargs)])[0]
    assert emb.meta["second_per_grid_t"] == pytest.approx(float(inputs["second_per_grid_ts"][0]))
    assert float(inputs["second_per_grid_ts"][0]) != pytest.approx(2 / 24)  # not the no-metadata default


def test_audio_embeds_chat_part_matches_transformers_and_is_refused_without_audio(tiny_model_dirs, vl):
    """vLLM's `audio_embeds` part: the clip's embedding (as the towers computed it) gives transformers' tokens for
    the clip itself; a family without audio refuses the part (400 naming the modality)."""
    from offline_helpers import hf_generate, make_audio

    from mmpipe.shared.media.embeds import encode_tensor_b64

    path = tiny_model_dirs["qwen2_audio"]
    llm = LLM(str(path), device="cpu", engine=ENGINE, enable_mm_embeds=True)
    aud = make_audio(seed=21)
    item = llm.resolver.loader.load("audio", (aud, 16000), target_sampling_rate=llm.adapter.audio_sampling_rate)
    emb = llm.adapter.encode("audio", [llm.adapter.preprocess(item)])[0].tensor
    part = {"type": "audio_embeds", "audio_embeds": encode_tensor_b64(emb)}
    msgs = [{"role": "user", "content": [part, {"type": "text", "text": "What's that sound?"}]}]
    out = llm.chat(msgs, GREEDY, use_tqdm=False)[0]
    prompt = chat_prompt(path, [{"role": "user", "content": [{"type": "audio"},
                                                             {"type": "text", "text": "What's that sound?"}]}])
    assert out.outputs[0].token_ids == hf_generate(path, prompt, audio=[aud], max_new_tokens=GREEDY.max_tokens,
                                                   add_special_tokens=False)
    vl_llm, _ = vl
    with pytest.raises(InvalidInputError, match="audio") as ei:
        vl_llm.chat(msgs, GREEDY, use_tqdm=False)
    assert ei.value.http_status == 400


def llm_ref(url: str):
    from mmpipe.shared.inputs.parse import ItemRef

    return ItemRef(modality="video", index=0, source=url)
