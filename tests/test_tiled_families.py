"""LLaVA-NeXT and InternVL offline: tiled images whose row count depends on the image size, against
transformers' `model.generate(**processor(...))` (fp32, CPU).

LLaVA-NeXT: anyres tiles, unpadded feature grid with an `image_newline` row after each feature row; InternVL:
dynamic tiles plus a thumbnail, pixel shuffle, each image wrapped in `<img>` ... `</img>`. One-image chat parity
and InternVL's image + mp4 video chat parity are in test_offline_parity.py (the family matrix), stage-only weights
in test_stage_weights.py."""
from __future__ import annotations

import pytest
import torch
from offline_helpers import (  # noqa: F401 (tiny_model_dirs is a fixture)
    chat_prompt, hf_generate, make_image, make_video, oracle_model, tiny_model_dirs,
)

from mmpipe import LLM, SamplingParams
from mmpipe.shared.errors import InvalidInputError, UnsupportedError
from mmpipe.shared.types import MediaItem

FAMILIES = ["llava_next", "internvl"]
TEXT = "Describe the image. What is in this picture?"
# three sizes that tile differently in both families (LLaVA-NeXT: 2x2, 1x2 and 2x1 pinpoints; InternVL: 2x2 + a
# thumbnail, 1x2 + a thumbnail, one tile)
IMAGES = [make_image(112, 84, seed=1), make_image(56, 112, seed=2), make_image(64, 48, seed=3)]
MEDIA = [IMAGES[:1], [], IMAGES[1:]]
LENS = (7, 9, 8)


def _prompts(path, n_images: list[int]) -> list[str]:
    return [chat_prompt(path, [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": TEXT}]}])
            for n in n_images]


def _item(llm: LLM, img):
    return llm.adapter.preprocess(MediaItem("image", img, "0" * 64))


def _num_tokens(llm: LLM, img) -> int:
    return _item(llm, img).meta["num_tokens"]


@pytest.fixture(scope="module")
def refs(tiny_model_dirs):  # noqa: F811
    """Per family: three prompts (one image, none, two of other sizes), transformers' greedy tokens for each, and
    a number of KV blocks (of 4) that admits every prompt but cannot hold the batch to its end (preemption)."""
    out = {}
    for family in FAMILIES:
        path = tiny_model_dirs[family]
        prompts = _prompts(path, [1, 0, 2])
        _, processor = oracle_model(str(path))
        lens = [len(processor(text=p, images=m or None, add_special_tokens=False)["input_ids"][0])
                for p, m in zip(prompts, MEDIA)]
        need = [-(-(n + k) // 4) for n, k in zip(lens, LENS)]
        blocks = max(max(need), sum(-(-n // 4) for n in lens))  # every prompt admitted, and each one fits
        assert blocks < sum(need)  # ... but not all of them to the end
        out[family] = prompts, [hf_generate(path, p, images=m or None, max_new_tokens=n, add_special_tokens=False)
                                for p, m, n in zip(prompts, MEDIA, LENS)], blocks
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preempt", [False, True], ids=["one-step", "preemption"])
def test_mixed_batch_matches_transformers(family, preempt, refs, tiny_model_dirs):  # noqa: F811
    prompts, want, blocks = refs[family]
    # too few blocks for the whole batch: a request is preempted and recomputed
    kw = {"kv_cache_blocks": blocks, "block_size": 4} if preempt else {}
    llm = LLM(str(tiny_model_dirs[family]), device="cpu", **kw)
    sizes = [_num_tokens(llm, im) for im in IMAGES]
    assert len(set(sizes)) == len(IMAGES), sizes  # the row count follows the image size
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": m}} if m else p for p, m in zip(prompts, MEDIA)],
                        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in LENS], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    if preempt:
        assert llm.engine.scheduler.num_preemptions > 0


def _features(family: str, path: str, img) -> torch.Tensor:
    """transformers' own rows for `img` (LLaVA-NeXT: packed, newline rows included; InternVL: every tile's)."""
    model, processor = oracle_model(path)
    inp = processor(text=processor.image_token, images=[img], return_tensors="pt")
    with torch.inference_mode():
        if family == "llava_next":
            return model.get_image_features(pixel_values=inp["pixel_values"],
                                            image_sizes=inp["image_sizes"]).pooler_output[0]
        o = model.get_image_features(pixel_values=inp["pixel_values"]).pooler_output
    return o.reshape(-1, o.shape[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_precomputed_image_embeds_match_transformers(family, tiny_model_dirs):  # noqa: F811
    path = str(tiny_model_dirs[family])
    llm = LLM(path, device="cpu", enable_mm_embeds=True)
    prompt = _prompts(path, [1])[0]
    img = IMAGES[0]
    rows = _features(family, path, img)
    assert rows.shape[0] == _num_tokens(llm, img)
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": rows[None]}},
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_generate(path, prompt, images=[img], add_special_tokens=False)
    assert llm.stats["items_encoded"] == 0
    with pytest.raises(InvalidInputError) as e:  # a row width that is not the text hidden size
        llm.generate({"prompt": prompt, "multi_modal_data": {"image": rows[None, :, :-1]}}, use_tqdm=False)
    assert e.value.param == "image_embeds"


def test_internvl_image_embeds_must_be_whole_tiles(tiny_model_dirs):  # noqa: F811
    from mmpipe.shared.models.tiny import INTERNVL_TILE_TOKENS

    llm = LLM(str(tiny_model_dirs["internvl"]), device="cpu", enable_mm_embeds=True)
    with pytest.raises(InvalidInputError, match=f"tiles of {INTERNVL_TILE_TOKENS} rows") as e:
        llm.adapter.embeds_from_user("image", torch.zeros(INTERNVL_TILE_TOKENS + 1, llm.adapter.hidden_size))
    assert e.value.param == "image_embeds"


def test_internvl_expansion_wraps_each_image(tiny_model_dirs):  # noqa: F811
    """The token ids the engine gets are the processor's own: `<img>`, the rows, `</img>` per image."""
    from mmpipe.shared.inputs.assemble import expand_prompt

    path = str(tiny_model_dirs["internvl"])
    llm = LLM(path, device="cpu")
    prompt = _prompts(path, [2])[0]
    embeds = llm.adapter.encode("image", [_item(llm, im) for im in IMAGES[1:]])
    ids = llm.tokenizer(prompt, add_special_tokens=False).input_ids
    got = expand_prompt(ids, embeds, llm.adapter.placeholder_ids(), None, llm.adapter.item_tokens()).token_ids
    _, processor = oracle_model(path)
    assert got == processor(text=prompt, images=IMAGES[1:], return_tensors="pt")["input_ids"][0].tolist()


def test_internvl_video_and_image_in_a_mixed_batch(tiny_model_dirs):  # noqa: F811
    """Clips of different lengths (a `Frame{i}: <img>...</img>` line per frame), one beside an image, in a batch
    with a text prompt; precomputed video embeddings are refused (the prompt needs each frame's line). One clip
    per prompt: transformers' processor cannot stack clips of different lengths into one call."""
    path = str(tiny_model_dirs["internvl"])
    llm = LLM(path, device="cpu", enable_mm_embeds=True)
    short, long = make_video(n=3, h=56, w=84, seed=5), make_video(n=5, h=64, w=64, seed=6)
    both = chat_prompt(path, [{"role": "user", "content": [{"type": "video"}, {"type": "image"},
                                                           {"type": "text", "text": TEXT}]}])
    clip = chat_prompt(path, [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": TEXT}]}])
    text = _prompts(path, [0])[0]
    outs = llm.generate([{"prompt": both, "multi_modal_data": {"video": short, "image": IMAGES[0]}}, text,
                         {"prompt": clip, "multi_modal_data": {"video": long}}],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [
        hf_generate(path, both, images=[IMAGES[0]], videos=[short], add_special_tokens=False),
        hf_generate(path, text, add_special_tokens=False),
        hf_generate(path, clip, videos=[long], add_special_tokens=False)]
    with pytest.raises(UnsupportedError) as e:
        llm.generate({"prompt": clip, "multi_modal_data": {"video": torch.zeros(1, 12, 64)}}, use_tqdm=False)
    assert e.value.param == "video_embeds"


@pytest.mark.parametrize("family,want", [
    ("llava_next", "Be brief. USER: <image>\nWhat? ASSISTANT: A cat.</s>USER: More? ASSISTANT:"),
    ("internvl", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\nWhat?<|im_end|>\n"
                 "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n"),
])
def test_chat_template_fallback(family, want, tiny_model_dirs):  # noqa: F811
    from mmpipe.shared.chat.templates import FALLBACK_TEMPLATES, apply_template

    _, processor = oracle_model(str(tiny_model_dirs[family]))
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "More?"}]
    assert apply_template(processor, FALLBACK_TEMPLATES[family], msgs) == want
