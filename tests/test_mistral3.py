"""Mistral 3 / Pixtral offline: images of different sizes (their own token grids, rows closed by [IMG_BREAK] and
the last by [IMG_END]), a batch mixed with a text-only prompt, chunked prefill through the image rows and
preemption, against transformers' `generate` (fp32, CPU; every decoder layer windowed to 24 tokens and the
prompts longer than that).

One-image chat parity and several images in one prompt are in test_offline_parity.py (the family matrix),
stage-only weights in test_stage_weights.py, the served path in test_mistral3_served.py."""
from __future__ import annotations

import pytest
import torch
from offline_helpers import chat_prompt, hf_generate, make_image, oracle_model, tiny_model_dirs  # noqa: F401

from mmpipe import LLM
from mmpipe.shared.errors import UnsupportedError
from mmpipe.shared.models.tiny import MISTRAL3_SLIDING_WINDOW
from mmpipe.shared.types import SamplingParams

TEXT = "Describe the image. What is in this picture? Please tell me how many objects you can see."
# 112x84 -> 4 x 3 tokens, 56x56 -> 4 x 4 (upscaled to the 64 px edge), 84x112 -> 3 x 4
IMAGES = [make_image(seed=1), make_image(w=56, h=56, seed=2), make_image(w=84, h=112, seed=3)]
MEDIA = [IMAGES[:1], [], IMAGES[1:]]
LENS = (10, 7, 12)


@pytest.fixture(scope="module")
def path(tiny_model_dirs):  # noqa: F811
    return tiny_model_dirs["mistral3"]


def _prompts(path, n_images: list[int]) -> list[str]:
    return [chat_prompt(path, [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": TEXT}]}])
            for n in n_images]


@pytest.fixture(scope="module")
def batch(path):
    """Three prompts (one image, none, two of other sizes) and transformers' greedy tokens for each."""
    prompts = _prompts(path, [1, 0, 2])
    refs = [hf_generate(path, p, images=m or None, max_new_tokens=n, add_special_tokens=False)
            for p, m, n in zip(prompts, MEDIA, LENS)]
    return prompts, refs


@pytest.mark.parametrize("kw", [
    {},                                                      # whole prompts in one step
    {"max_num_batched_tokens": 13, "block_size": 4},         # chunks end inside image rows
    {"kv_cache_blocks": 24, "block_size": 4},                # too few blocks for the batch: preemption, recompute
], ids=["one-step", "chunked", "preemption"])
def test_mixed_batch_matches_transformers(path, batch, kw):
    prompts, refs = batch
    llm = LLM(str(path), device="cpu", **kw)
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": m}} if m else p for p, m in zip(prompts, MEDIA)],
                        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in LENS], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert all(len(o.prompt_token_ids) > MISTRAL3_SLIDING_WINDOW for o in outs)
    if "kv_cache_blocks" in kw:
        assert llm.engine.scheduler.num_preemptions > 0


def test_each_image_expands_to_its_own_grid(path):
    """The prompt the engine runs holds each image's rows as the processor writes them."""
    llm = LLM(str(path), device="cpu")
    _, processor = oracle_model(str(path))
    prompt = _prompts(path, [2])[0]
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": IMAGES[1:]}},
                       SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)[0]
    want = processor(text=prompt, images=IMAGES[1:], add_special_tokens=False).input_ids[0]
    assert out.prompt_token_ids == list(want)
    toks = processor.tokenizer.convert_ids_to_tokens(out.prompt_token_ids)
    assert toks.count("[IMG]") == 4 * 4 + 3 * 4 and toks.count("[IMG_END]") == 2
    assert toks.count("[IMG_BREAK]") == (4 - 1) + (4 - 1)  # a break closes every row but each image's last


def test_every_layer_is_windowed(path):
    llm = LLM(str(path), device="cpu")
    assert llm.engine.runner.decoder.spec.layer_windows == (MISTRAL3_SLIDING_WINDOW,) * 2


def test_image_embeds_are_refused(path):
    llm = LLM(str(path), device="cpu", enable_mm_embeds=True)
    with pytest.raises(UnsupportedError) as e:
        llm.generate({"prompt": "[IMG] Describe.", "multi_modal_data": {"image": torch.zeros(1, 4, 64)}},
                     use_tqdm=False)
    assert e.value.param == "image_embeds"


def test_chat_template_fallback(path):
    from mmpipe.shared.chat.templates import FALLBACK_TEMPLATES, apply_template

    _, processor = oracle_model(str(path))
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "More?"}]
    got = apply_template(processor, FALLBACK_TEMPLATES["mistral3"], msgs)
    assert got == "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST][IMG]What?[/INST]A cat.</s>[INST]More?[/INST]"
    assert got == processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
