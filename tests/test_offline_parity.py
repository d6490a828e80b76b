"""LLM.generate / LLM.chat give greedy token ids identical to transformers' own generate, every family."""
from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from mmpipe import LLM, SamplingParams
from offline_helpers import (  # noqa: F401 (tiny_model_dirs is a fixture)
    ENGINE, FAMILY_MODALITIES, chat_prompt, hf_chat_generate, hf_generate, make_audio, make_image, make_video, png_bytes,
    tiny_model_dirs, wav_b64, write_mp4,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llms(tiny_model_dirs):
    made: dict[str, LLM] = {}

    def get(family: str, **kw) -> LLM:
        key = family + repr(sorted(kw.items()))
        if key not in made:
            made[key] = LLM(str(tiny_model_dirs[family]), device="cpu", engine=ENGINE, **kw)
        return made[key]

    return get


def _media(modality: str, seed: int = 0):
    return {"image": make_image(seed=seed), "video": make_video(seed=seed + 1),
            "audio": make_audio(seed=seed + 2)}[modality]


@pytest.mark.parametrize("family", list(FAMILY_MODALITIES))
def test_chat_every_modality_matches_transformers(family, llms, tiny_model_dirs, tmp_path_factory):
    path = tiny_model_dirs[family]
    mods = FAMILY_MODALITIES[family]
    media_dir = tmp_path_factory.mktemp("media")
    llm = llms(family, allowed_local_media_path=str(media_dir))
    img, aud = _media("image"), _media("audio")
    mp4 = write_mp4(media_dir / "clip.mp4", make_video(n=4, h=64, w=96, seed=1))
    parts, tpl = [], []
    for m in mods:
        tpl.append({"type": m})
        if m == "image":
            parts.append({"type": "image_pil", "image_pil": img})
        elif m == "video":
            parts.append({"type": "video_url", "video_url": {"url": f"file://{mp4}"}})
        else:
            parts.append({"type": "input_audio", "input_audio": {"data": wav_b64(aud), "format": "wav"}})
    text = "Describe it."
    messages = [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    # the oracle gets the frames exactly as decoded (h264 is lossy; decoding is the loader's job, tested apart)
    frames = llm.resolver.loader.load("video", f"file://{mp4}").data if "video" in mods else None
    # ... and the clip's timing: 4 frames at 4 fps (Qwen2.5-VL's temporal positions follow it)
    timing = {"video_metadata": [{"fps": 4.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}]} \
        if "video" in mods else {}
    if family == "voxtral":  # its processor takes audio through mistral-common's chat encoding only
        ref = hf_chat_generate(path, [aud, text])
    else:
        prompt = chat_prompt(path, [{"role": "user", "content": tpl + [{"type": "text", "text": text}]}])
        ref = hf_generate(path, prompt, images=[img] if "image" in mods else None,
                          videos=[frames] if "video" in mods else None,
                          audio=[aud] if "audio" in mods else None, add_special_tokens=False, **timing)
    assert out.outputs[0].token_ids == ref
    assert out.outputs[0].finish_reason == "length"
    assert isinstance(out.outputs[0].text, str)


def _wav_b64(a: np.ndarray, sr: int = 16000) -> str:
    buf = io.BytesIO()
    sf.write(buf, a, sr, format="WAV", subtype="FLOAT")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "llava", "gemma3", "llava_next", "internvl",
                                    "mistral3"])
def test_generate_several_images_in_one_prompt(family, llms, tiny_model_dirs):
    path = tiny_model_dirs[family]
    llm = llms(family)
    ph = llm.adapter.placeholder_token("image")
    imgs = [make_image(seed=3), make_image(w=84, h=112, seed=4)]
    prompt = f"First {ph} then {ph} compare."
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": imgs}}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_generate(path, prompt, images=imgs)


def test_generate_mixed_batch(llms, tiny_model_dirs):
    path = tiny_model_dirs["qwen2_vl"]
    llm = llms("qwen2_vl")
    ip, vp = llm.adapter.placeholder_token("image"), llm.adapter.placeholder_token("video")
    img, vid = make_image(seed=5), make_video(seed=6)
    prompts = [
        {"prompt": f"What is in {ip}?", "multi_modal_data": {"image": img}},
        "A plain text prompt without media.",
        {"prompt": f"Watch {vp} and {ip}.", "multi_modal_data": {"video": vid, "image": [img]}},
        {"prompt": f"Only the clip {vp} please, describe the video.", "multi_modal_data": {"video": [vid]}},
    ]
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 8, 5, 9)],
                        use_tqdm=False)
    refs = [hf_generate(path, prompts[0]["prompt"], images=[img], max_new_tokens=6),
            hf_generate(path, prompts[1], max_new_tokens=8),
            hf_generate(path, prompts[2]["prompt"], images=[img], videos=[vid], max_new_tokens=5),
            hf_generate(path, prompts[3]["prompt"], videos=[vid], max_new_tokens=9)]
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert outs[1].num_prompt_tokens == len(llm.tokenizer(prompts[1]).input_ids)


def test_video_as_list_of_frames_and_tensor(llms, tiny_model_dirs):
    path = tiny_model_dirs["qwen2_5_vl"]
    llm = llms("qwen2_5_vl")
    vp = llm.adapter.placeholder_token("video")
    vid = make_video(seed=7)
    prompt = f"Clip: {vp}"
    ref = hf_generate(path, prompt, videos=[vid])
    from PIL import Image

    frames = [Image.fromarray(f) for f in vid]
    for v in (frames, torch.from_numpy(vid), vid):
        out = llm.generate({"prompt": prompt, "multi_modal_data": {"video": v}}, GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == ref


def test_audio_is_resampled_to_model_rate(llms, tiny_model_dirs):
    import soxr

    path = tiny_model_dirs["qwen2_audio"]
    llm = llms("qwen2_audio")
    ap = llm.adapter.placeholder_token("audio")
    a8k = make_audio(sr=8000, seed=9)
    prompt = f"Audio 1: {ap} what is it?"
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"audio": (a8k, 8000)}}, GREEDY, use_tqdm=False)[0]
    ref = hf_generate(path, prompt, audio=[soxr.resample(a8k, 8000, 16000).astype(np.float32)])
    assert out.outputs[0].token_ids == ref


def test_precomputed_image_embeddings(tiny_model_dirs):
    from offline_helpers import oracle_model

    for family in ("llava", "qwen2_vl"):
        path = str(tiny_model_dirs[family])
        llm = LLM(path, device="cpu", engine=ENGINE, enable_mm_embeds=True)
        model, processor = oracle_model(path)
        img = make_image(seed=11)
        ph = llm.adapter.placeholder_token("image")
        prompt = f"Embedded {ph} describe."
        ref = hf_generate(path, prompt, images=[img])
        inp = processor(text=ph, images=[img], return_tensors="pt")
        with torch.inference_mode():
            if family == "llava":
                feats = model.get_image_features(pixel_values=inp["pixel_values"]).pooler_output
                data = {"image": torch.stack(list(feats))}  # (num_items, feature_size, hidden)
            else:
                feats = model.get_image_features(pixel_values=inp["pixel_values"],
                                                 image_grid_thw=inp["image_grid_thw"]).pooler_output
                data = {"image": {"image_embeds": torch.cat(list(feats)), "image_grid_thw": inp["image_grid_thw"]}}
        out = llm.generate({"prompt": prompt, "multi_modal_data": data}, GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == ref, family
        assert llm.stats["items_encoded"] == 0


def test_image_url_data_url_and_local_file(tmp_path, tiny_model_dirs):
    path = tiny_model_dirs["llava"]
    img = make_image(w=64, h=48, seed=12)
    data = png_bytes(img)
    (tmp_path / "cat.png").write_bytes(data)
    llm = LLM(str(path), device="cpu", engine=ENGINE, allowed_local_media_path=str(tmp_path))
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    ref = hf_generate(path, chat_prompt(path, [{"role": "user", "content": [{"type": "image"},
                                                                            {"type": "text", "text": "Hi"}]}]),
                      images=[img], add_special_tokens=False)
    for u in (url, f"file://{tmp_path / 'cat.png'}"):
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}},
                                             {"type": "text", "text": "Hi"}]}]
        assert llm.chat(msgs, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == ref
