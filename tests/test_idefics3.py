"""Idefics3 and SmolVLM offline: split images (tiles + global image, row/column markers), a batch mixed with other
prompts under preemption, the processor's `do_image_splitting` setting, what is refused, the chat-template
fallback; against transformers' `model.generate(**processor(...))` (fp32, CPU).

One-image chat parity is in test_offline_parity.py (the family matrix), stage-only weights in
test_stage_weights.py, the served stack in test_idefics3_served.py."""
from __future__ import annotations

import pytest
import torch

from mmpipe import LLM, SamplingParams
from mmpipe.shared.errors import UnsupportedError
from offline_helpers import (  # noqa: F401 (tiny_model_dirs is a fixture)
    ENGINE, chat_prompt, hf_generate, make_image, oracle_model, tiny_model_dirs,
)

FAMILIES = ("idefics3", "smolvlm")
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
# 112x84 -> 2x2 tiles + global, 112x56 -> 1x2 + global, 56x112 -> 2x1 + global: 20, 12 and 12 feature rows
IMAGES = [make_image(112, 84, seed=1), make_image(112, 56, seed=2), make_image(56, 112, seed=3)]


def _prompt(path, n_images: int, text: str = "What is in this picture?") -> str:
    return chat_prompt(path, [{"role": "user", "content": [{"type": "image"}] * n_images
                               + [{"type": "text", "text": text}]}])


@pytest.fixture(scope="module")
def llms(tiny_model_dirs):  # noqa: F811
    made: dict[str, LLM] = {}

    def get(family: str) -> LLM:
        if family not in made:
            made[family] = LLM(str(tiny_model_dirs[family]), device="cpu", engine=ENGINE, enable_mm_embeds=True)
        return made[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_images_of_different_sizes_expand_as_the_processor_does(family, llms, tiny_model_dirs):
    path = tiny_model_dirs[family]
    llm = llms(family)
    prompt = _prompt(path, 3)
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": IMAGES}}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_generate(path, prompt, images=IMAGES, add_special_tokens=False)
    # the engine ran transformers' own expanded prompt: tile grids, row/column markers, global images
    _, processor = oracle_model(str(path))
    expanded = processor(text=prompt, images=IMAGES, add_special_tokens=False).input_ids[0]
    assert out.prompt_token_ids == expanded
    assert out.prompt_token_ids.count(processor.image_token_id) == 20 + 12 + 12
    assert "<row_2_col_2>" in llm.tokenizer.decode(out.prompt_token_ids)
    other = llm.generate({"prompt": prompt, "multi_modal_data": {"image": IMAGES[::-1]}}, GREEDY,
                         use_tqdm=False)[0]
    assert other.outputs[0].token_ids != out.outputs[0].token_ids  # the answer depends on the images


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_mixed_with_other_prompts_under_preemption(family, tiny_model_dirs):
    """Three prompts in one call (two images, text only, one image) on a KV cache too small for all three, in
    chunks of 32 tokens: requests are preempted and recomputed with the same rows and markers."""
    path = tiny_model_dirs[family]
    llm = LLM(str(path), device="cpu", engine=ENGINE, kv_cache_blocks=28, block_size=4, max_num_batched_tokens=32,
              enable_prefix_caching=False)
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt": _prompt(path, 2), "multi_modal_data": {"image": IMAGES[:2]}},
               _prompt(path, 0, "Hello, how are you? Tell me a story."),
               {"prompt": _prompt(path, 1), "multi_modal_data": {"image": IMAGES[2:]}}]
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert llm.engine.kv_cache_info()["num_preemptions"] > 0
    refs = [hf_generate(path, prompts[0]["prompt"], images=IMAGES[:2], max_new_tokens=12, add_special_tokens=False),
            hf_generate(path, prompts[1], max_new_tokens=12, add_special_tokens=False),
            hf_generate(path, prompts[2]["prompt"], images=IMAGES[2:], max_new_tokens=12, add_special_tokens=False)]
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_image_splitting_off_gives_one_global_image(tiny_model_dirs):
    """`do_image_splitting=False` (the server's mm_processor_kwargs): every image is one tile, no row markers."""
    path = tiny_model_dirs["idefics3"]
    llm = LLM(str(path), device="cpu", engine=ENGINE, mm_processor_kwargs={"do_image_splitting": False})
    prompt = _prompt(path, 2)
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": IMAGES[:2]}}, GREEDY, use_tqdm=False)[0]
    ref = hf_generate(path, prompt, images=IMAGES[:2], add_special_tokens=False, do_image_splitting=False)
    assert out.outputs[0].token_ids == ref
    _, processor = oracle_model(str(path))
    assert out.prompt_token_ids.count(processor.image_token_id) == 2 * 4
    assert "<row_1_col_1>" not in llm.tokenizer.decode(out.prompt_token_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_embeds_and_other_tile_sizes_are_refused(family, llms, tiny_model_dirs):
    path = tiny_model_dirs[family]
    llm = llms(family)
    prompt = _prompt(path, 1)
    with pytest.raises(UnsupportedError) as e:
        llm.generate({"prompt": prompt, "multi_modal_data": {"image": torch.zeros(1, 20, 64)}}, use_tqdm=False)
    assert e.value.param == "image_embeds"
    with pytest.raises(UnsupportedError) as e:
        llm.generate({"prompt": prompt, "multi_modal_data": {"video": torch.zeros(2, 8, 8, 3, dtype=torch.uint8)}},
                     use_tqdm=False)
    assert "video" in str(e.value)
    # the LLM keeps serving
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": IMAGES[0]}}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_generate(path, prompt, images=IMAGES[:1], add_special_tokens=False)
    with pytest.raises(UnsupportedError) as e:
        LLM(str(path), device="cpu", engine=ENGINE, mm_processor_kwargs={"max_image_size": {"longest_edge": 28}})
    assert e.value.param == "mm_processor_kwargs.max_image_size"


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_fallback(family, tiny_model_dirs):
    from mmpipe.shared.chat.templates import FALLBACK_TEMPLATES, apply_template

    _, processor = oracle_model(str(tiny_model_dirs[family]))
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A cat."}, {"role": "user", "content": [{"type": "text", "text": "More?"}]}]
    got = apply_template(processor, FALLBACK_TEMPLATES[family], msgs)
    bos = processor.tokenizer.bos_token
    assert got == (f"{bos}System: Be brief.<end_of_utterance>\nUser:<image>What?<end_of_utterance>\n"
                   "Assistant: A cat.<end_of_utterance>\nUser: More?<end_of_utterance>\nAssistant:")
    assert got == processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
