"""KV blocks behind the sliding window given back mid-sequence (window.py, block_manager.py, scheduler.py), for a
model whose every layer is windowed: the tiny Mistral 3's decoder (Mistral's `sliding_window` on all layers,
MISTRAL3_SLIDING_WINDOW = 24 tokens), text prompts of 35-48 tokens and 20 generated tokens, against
transformers' `generate` (fp32, CPU): a batch in one step, chunked prefill, preemption under a KV cache smaller
than one sequence, prefix caching on and off; the blocks coming back while a sequence runs (and the generator's
counter of them); a sequence longer than the whole cache; window-aware prefix-cache hits and ref-counted release
in the block manager itself. Gemma 3 (global layers) frees nothing: test_gemma3.py. The kernels never reading
behind the window: test_engine_kernels_interp.py "behind_window"."""
from __future__ import annotations

import pytest
from offline_helpers import chat_prompt, hf_generate, oracle_model, tiny_model_dirs  # noqa: F401

from mmpipe import LLM
from mmpipe.shared.engine.block_manager import BlockManager
from mmpipe.shared.engine.sequence import Sequence
from mmpipe.shared.engine.window import FREED_BLOCK, peak_blocks
from mmpipe.shared.errors import LimitExceededError
from mmpipe.shared.models.tiny import MISTRAL3_SLIDING_WINDOW as WINDOW
from mmpipe.shared.types import EngineRequest, SamplingParams

TEXTS = ["Hello, how are you? Tell me a story about the people in the room and the car, and what they did next.",
         "What is in this picture? Please tell me how many objects you can see, and which colours they have. Be brief.",
         "Describe the image. What is in this picture? Please tell me how many objects you can see."]
OUT = 20
GREEDY = SamplingParams(temperature=0, max_tokens=OUT, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_model_dirs):  # noqa: F811
    return tiny_model_dirs["mistral3"]


@pytest.fixture(scope="module")
def batch(path):
    """Three text prompts longer than the window and transformers' greedy tokens for each."""
    prompts = [chat_prompt(path, [{"role": "user", "content": t}]) for t in TEXTS]
    refs = [hf_generate(path, p, max_new_tokens=OUT, add_special_tokens=False) for p in prompts]
    return prompts, refs


def _ids(path, prompt: str) -> list[int]:
    return oracle_model(str(path))[1].tokenizer(prompt, add_special_tokens=False).input_ids


CONFIGS = {
    "one-step": dict(block_size=4, kv_cache_blocks=64),
    "chunked": dict(block_size=8, kv_cache_blocks=32, max_num_batched_tokens=10),
    "preemption": dict(block_size=4, kv_cache_blocks=10),  # 40 tokens: less than each sequence
    "no-prefix-cache": dict(block_size=8, kv_cache_blocks=6, max_num_batched_tokens=8, enable_prefix_caching=False),
}


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS)
def test_batch_matches_transformers(path, batch, kw):
    prompts, refs = batch
    llm = LLM(str(path), device="cpu", **kw)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert all(len(o.prompt_token_ids) > WINDOW for o in outs)
    eng, bs = llm.engine, kw["block_size"]
    assert eng.block_manager.window == WINDOW
    assert eng.stats["window_freed_blocks"] > 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks  # every block came back
    if kw["kv_cache_blocks"] * bs < max(len(o.prompt_token_ids) for o in outs) + OUT:
        assert eng.max_model_len > kw["kv_cache_blocks"] * bs  # not capped by the cache: the window fits
        assert eng.scheduler.num_preemptions > 0


def test_prefix_cache_hits_after_the_head_was_evicted(path, batch):
    """The same prompt again once the cache has evicted the first blocks of its first run: the blocks its first
    computed token can see are still cached, so it hits, and its answer is transformers'."""
    from engine_helpers import run_engine

    prompts, refs = batch
    llm = LLM(str(path), device="cpu", block_size=4, kv_cache_blocks=12)
    ids = _ids(path, prompts[1])
    arrivals = {0: [EngineRequest("a", ids, GREEDY)], 40: [EngineRequest("a2", ids, GREEDY)]}
    res = run_engine(llm.engine, arrivals)
    assert res.tokens["a"] == res.tokens["a2"] == refs[1]
    assert llm.engine.stats["prefix_cache_evictions"] > 0
    assert res.cached["a"] == 0 and res.cached["a2"] == (len(ids) - 1) // 4 * 4


def test_blocks_come_back_while_the_sequence_runs(path, batch):
    from mmpipe.services.generator.core import _EngineCounters

    prompts, refs = batch
    llm = LLM(str(path), device="cpu", block_size=4, kv_cache_blocks=64)
    eng, bm = llm.engine, llm.engine.block_manager
    ids = _ids(path, prompts[1])
    eng.add_request(EngineRequest("a", ids, GREEDY))
    tokens, freed, free = [], [], []
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens += out.new_token_ids
        if eng.has_unfinished_requests():
            freed.append(eng.stats["window_freed_blocks"])
            free.append(bm.num_free_blocks)
    assert tokens == refs[1]
    assert freed == sorted(freed) and freed[0] == 0 and freed[-1] >= (len(ids) + OUT - 2 - WINDOW) // 4 - 1
    # the prefill held every prompt block; from the next step on the sequence holds its window's blocks only
    assert free[0] == 64 - len(ids) // 4
    assert min(free[1:]) >= 64 - peak_blocks(len(ids) + OUT, 4, WINDOW)
    metric = {f.name: f for f in _EngineCounters(eng, "tiny").collect()}["mmpipe_generator_engine_window_freed_blocks"]
    assert [s.value for s in metric.samples] == [eng.stats["window_freed_blocks"]] and freed[-1] > 0


@pytest.mark.parametrize("budget", [8, 2048])
def test_a_sequence_longer_than_the_kv_cache_completes(path, batch, budget):
    """8 blocks of 4 hold 32 tokens; the prompt has 48 and the sequence 68, but the window's 7 blocks fit. The
    prompt is prefilled chunk by chunk, each chunk cut to the blocks given back behind the window."""
    prompts, refs = batch
    llm = LLM(str(path), device="cpu", block_size=4, kv_cache_blocks=8, max_num_batched_tokens=budget)
    assert llm.engine.max_model_len > 8 * 4
    out = llm.generate(prompts[1], GREEDY, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) > 8 * 4 and out.outputs[0].token_ids == refs[1]
    assert llm.engine.block_manager.num_free_blocks == 8


def test_the_cache_caps_the_length_when_the_window_does_not_fit(path, batch):
    """6 blocks of 4 cannot hold the 7 blocks 24 keys may span: max_model_len stays capped by the cache."""
    prompts, _ = batch
    llm = LLM(str(path), device="cpu", block_size=4, kv_cache_blocks=6)
    assert peak_blocks(10_000, 4, WINDOW) == 7 and llm.engine.max_model_len == 6 * 4
    with pytest.raises(LimitExceededError):
        llm.generate(prompts[1], GREEDY, use_tqdm=False)


def _seq(tokens: list[int], rid: str) -> Sequence:
    return Sequence(EngineRequest(rid, tokens, SamplingParams(max_tokens=1)), max_model_len=1000, eos_token_ids=[],
                    generator=None)


def test_block_manager_window_hits_and_ref_counted_release():
    bm = BlockManager(16, 4, enable_prefix_caching=True, window=8)
    prompt = list(range(40))
    a = _seq(prompt, "a")
    assert bm.allocate_prompt(a, 40) and len(a.block_table) == 10
    bm.commit(a, 40)
    a.num_computed_tokens = 40
    blocks = list(a.block_table)
    # a query at 40 sees keys from 33 on: blocks 0..7 are behind the window
    assert bm.release_behind_window(a, 40) == 8
    assert a.block_table[:8] == [FREED_BLOCK] * 8 and a.block_table[8:] == blocks[8:]
    assert bm.num_free_blocks == 14 and bm.num_window_freed_blocks == 8
    # the same prompt: its first computed token (36) sees blocks 7 and 8 only; 7 is revived from the free
    # queue (it kept its key), 8 is shared with a
    b = _seq(prompt, "b")
    assert bm.allocate_prompt(b, 40)
    assert b.num_computed_tokens == 36 and b.num_freed_blocks == 7
    assert b.block_table[:7] == [FREED_BLOCK] * 7 and b.block_table[7:9] == blocks[7:9]
    assert FREED_BLOCK not in b.block_table[7:] and bm.num_free_blocks == 12
    # a lets go of block 8, which b still holds: it does not come back
    assert bm.release_behind_window(a, 44) == 1 and bm.num_free_blocks == 12
    # another prompt takes every free block: a's cached blocks 0..6 are evicted
    c = _seq(list(range(100, 148)), "c")
    assert bm.allocate_prompt(c, 48) and bm.num_free_blocks == 0 and bm.num_evicted_blocks == 7
    bm.free(c)
    # the prompt once more: its head is gone, but blocks 7 and 8 (held by b) are all its first token sees
    d = _seq(prompt, "d")
    assert bm.allocate_prompt(d, 40) and d.num_computed_tokens == 36 and d.block_table[7:9] == blocks[7:9]
    for s in (b, a, d):
        bm.free(s)
    assert bm.num_free_blocks == 16
    # without a window nothing is given back
    plain = BlockManager(4, 4)
    e = _seq(list(range(12)), "e")
    assert plain.allocate_prompt(e) and plain.release_behind_window(e, 12) == 0 and FREED_BLOCK not in e.block_table
