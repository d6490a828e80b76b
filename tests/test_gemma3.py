"""Gemma 3 offline: sliding-window layers, bidirectional image attention, chunked prefill that never splits an
image, preemption, against transformers' `generate` (fp32, CPU, prompts longer than the 16-token window).

One-image and several-image chat parity is in test_offline_parity.py (the family matrix), stage-only weights
in test_stage_weights.py, the Triton paths in test_engine_triton_interp.py / test_engine_kernels_interp.py."""
from __future__ import annotations

import pytest
import torch
from offline_helpers import chat_prompt, hf_generate, make_image, tiny_model_dirs  # noqa: F401

from mmpipe.shared.engine.sequence import Sequence, mm_runs
from mmpipe.shared.errors import LimitExceededError, UnsupportedError
from mmpipe.shared.models.tiny import GEMMA3_IMAGE_TOKENS, GEMMA3_SLIDING_WINDOW
from mmpipe.shared.types import EngineRequest, SamplingParams

TEXT = "Describe the image. What is in this picture? Please tell me how many objects you can see, and where."


def _prompts(path, n_images: list[int]) -> list[str]:
    return [chat_prompt(path, [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": TEXT}]}])
            for n in n_images]


@pytest.fixture(scope="module")
def gemma_dir(tiny_model_dirs):  # noqa: F811
    return tiny_model_dirs["gemma3"]


IMAGES = [make_image(seed=1), make_image(w=56, h=56, seed=2), make_image(w=84, h=112, seed=3)]
MEDIA = [IMAGES[:1], [], IMAGES[1:]]
LENS = (12, 9, 14)


@pytest.fixture(scope="module")
def batch(gemma_dir):
    """Three prompts (one image, none, two of other sizes) and transformers' greedy tokens for each."""
    prompts = _prompts(gemma_dir, [1, 0, 2])
    refs = [hf_generate(gemma_dir, p, images=m or None, max_new_tokens=n) for p, m, n in zip(prompts, MEDIA, LENS)]
    return prompts, refs


@pytest.mark.parametrize("kw", [
    {},                                                      # whole prompts in one step
    {"max_num_batched_tokens": 13, "block_size": 4},         # chunks stop before each image, never inside one
    {"kv_cache_blocks": 28, "block_size": 4},                # too few blocks for the batch: preemption, recompute
], ids=["one-step", "chunked", "preemption"])
def test_mixed_batch_matches_transformers(gemma_dir, batch, kw):
    from mmpipe import LLM

    prompts, refs = batch
    llm = LLM(str(gemma_dir), device="cpu", **kw)
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": m}} if m else p for p, m in zip(prompts, MEDIA)],
                        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in LENS], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert all(len(o.prompt_token_ids) > 2 * GEMMA3_SLIDING_WINDOW for o in outs)
    if "kv_cache_blocks" in kw:
        assert llm.engine.scheduler.num_preemptions > 0
    # the global layers read every block: none is given back behind the window (window.py)
    assert llm.engine.block_manager.window is None and llm.engine.stats["window_freed_blocks"] == 0


def test_image_embeds_and_pan_and_scan_are_refused(gemma_dir):
    from mmpipe import LLM

    llm = LLM(str(gemma_dir), device="cpu", enable_mm_embeds=True)
    ph = llm.adapter.placeholder_token("image")
    with pytest.raises(UnsupportedError) as e:
        llm.generate({"prompt": f"{ph} Describe.", "multi_modal_data": {"image": torch.zeros(1, 4, 64)}},
                     use_tqdm=False)
    assert e.value.param == "image_embeds"
    p = _prompts(gemma_dir, [1])[0]
    got = llm.generate({"prompt": p, "multi_modal_data": {"image": make_image(seed=4)}},
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert got[0].outputs[0].token_ids == hf_generate(gemma_dir, p, images=[make_image(seed=4)], max_new_tokens=4)
    with pytest.raises(UnsupportedError) as e:
        LLM(str(gemma_dir), device="cpu", mm_processor_kwargs={"do_pan_and_scan": True})
    assert "do_pan_and_scan" in e.value.param


def _seq(positions: list[int], n_prompt: int) -> Sequence:
    req = EngineRequest(request_id="r", prompt_token_ids=[1] * n_prompt, sampling=SamplingParams(),
                        mm_embeds=torch.zeros(len(positions), 8), mm_positions=torch.tensor(positions))
    return Sequence(req, max_model_len=256, eos_token_ids=[], generator=None, bidirectional_mm=True)


def test_chunks_never_end_inside_an_image_run():
    pos = list(range(5, 9)) + list(range(20, 24))  # two images of 4 rows
    assert mm_runs(torch.tensor(pos)) == [(5, 9), (20, 24)]
    seq = _seq(pos, 30)
    assert seq.fit_chunk(7) == 5            # would end inside the first run: stop before it
    assert seq.fit_chunk(9) == 9            # ends right after it
    seq.num_computed_tokens = 5
    assert seq.fit_chunk(2) == 0            # the run does not fit: wait
    assert seq.fit_chunk(4) == 4
    # prefill limits: image rows see up to their run's last row, text rows only themselves
    assert seq.attn_limits(3, 11).tolist() == [3, 4, 8, 8, 8, 8, 9, 10]


def test_image_longer_than_the_step_budget_is_refused(gemma_dir):
    from mmpipe.shared.engine import EngineConfig, LLMEngine
    from mmpipe.shared.models.tiny import load_tiny_model

    model, _ = load_tiny_model(gemma_dir)
    engine = LLMEngine(model, EngineConfig(max_num_batched_tokens=GEMMA3_IMAGE_TOKENS - 1, num_kv_blocks=16))
    req = EngineRequest(request_id="r", prompt_token_ids=[5] * 10, sampling=SamplingParams(),
                        mm_embeds=torch.zeros(GEMMA3_IMAGE_TOKENS, 64),
                        mm_positions=torch.arange(2, 2 + GEMMA3_IMAGE_TOKENS))
    with pytest.raises(LimitExceededError) as e:
        engine.add_request(req)
    assert e.value.param == "max_num_batched_tokens"


def test_chat_template_fallback(gemma_dir):
    from offline_helpers import oracle_model

    from mmpipe.shared.chat.templates import FALLBACK_TEMPLATES, apply_template

    _, processor = oracle_model(str(gemma_dir))
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "More?"}]
    assert apply_template(processor, FALLBACK_TEMPLATES["gemma3"], msgs) == (
        "<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>What?<end_of_turn>\n<start_of_turn>model\nA cat."
        "<end_of_turn>\n<start_of_turn>user\nMore?<end_of_turn>\n<start_of_turn>model\n")


def test_served_stages_match_transformers(gemma_dir, redis_server):
    """Once through the real ingest -> encoder -> generator processes (the sliding window and the image's
    bidirectional rows in the generator's engine-core process), against transformers."""
    import asyncio
    import io

    from services_helpers import start_stage_services

    from mmpipe.services.common.convert import MediaSource
    from mmpipe.services.common.stage_clients import StageClients
    from offline_helpers import oracle_model, png_bytes

    img = make_image(seed=7)
    data = png_bytes(img)
    prompt = _prompts(gemma_dir, [1])[0]
    from PIL import Image

    ref = hf_generate(gemma_dir, prompt, images=[Image.open(io.BytesIO(data)).convert("RGB")], max_new_tokens=10)
    ids = oracle_model(str(gemma_dir))[1].tokenizer(prompt).input_ids
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)

    async def go(stack) -> list[int]:
        c = StageClients.connect(ingest=stack.ingest_addr, encoder=stack.encoder_addr, generator=stack.generator_addr)
        try:
            refs = await c.ingest.ingest([MediaSource("image", data=data)], request_id="g3-ingest")
            out: list[int] = []
            async for ch in c.generator.generate("g3-served", ids, refs, sp):
                out += ch.token_ids
            return out
        finally:
            await c.close()

    stack = start_stage_services(gemma_dir, redis_server, timeout_s=240.0)
    try:
        assert asyncio.run(go(stack)) == ref
    finally:
        stack.stop()
