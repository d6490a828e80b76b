"""Greedy parity of the engine with HF `model.generate(**processor(...))` on tiny models of every family:
staggered arrivals, chunked prefill cutting through an image's rows, preemption with recompute, cancellation."""
from __future__ import annotations

import pytest
import torch

from mmpipe.shared.engine import EngineConfig, LLMEngine
from mmpipe.shared.engine.block_manager import cdiv
from mmpipe.shared.errors import LimitExceededError
from mmpipe.shared.types import SamplingParams

from engine_helpers import REF_TOKENS, first_mm_span, get_case, run_engine

FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl", "qwen2_audio", "llava_onevision", "qwen2_5_omni", "qwen3_vl",
            "qwen3_vl_moe"]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_staggered_arrivals_match_generate(family):
    case = get_case(family)
    a, b, c = case.prompts
    engine = LLMEngine(case.model, EngineConfig())
    res = run_engine(engine, {0: [a.request("a")], 2: [b.request("b", greedy(7))], 5: [c.request("c", greedy(11))]})
    assert res.tokens["a"] == a.ref
    assert res.tokens["b"] == b.ref[:7]
    assert res.tokens["c"] == c.ref[:11]
    assert res.finish["b"] == "length"
    assert engine.kv_cache_info()["free_blocks"] == engine.kv_cache_info()["num_blocks"]


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_splits_image_rows(family):
    case = get_case(family)
    a, b, c = case.prompts
    start, n = first_mm_span(a)
    budget = start + max(1, n // 2)  # the first chunk of `a` ends inside its first image / audio rows
    assert start < budget < start + n < len(a.token_ids)
    engine = LLMEngine(case.model, EngineConfig(max_num_batched_tokens=budget, block_size=8))
    res = run_engine(engine, {0: [a.request("a")], 1: [b.request("b", greedy(9))], 3: [c.request("c")]})
    assert res.tokens["a"] == a.ref
    assert res.tokens["b"] == b.ref[:9]
    assert res.tokens["c"] == c.ref


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_prefill_cap_per_step_keeps_greedy_parity(family):
    """At most `max_prefills_per_step` prefill chunks per step (what keeps a step of many short prompts inside
    the mixed CUDA graphs): the prompts past the cap start a step later, with the same tokens."""
    case = get_case(family)
    a, b, c = case.prompts
    engine = LLMEngine(case.model, EngineConfig(max_prefills_per_step=1))
    seen = []
    real = engine.scheduler.schedule

    def schedule():
        out = real()
        seen.append(len(out.scheduled) - out.num_decodes)
        return out
    engine.scheduler.schedule = schedule
    res = run_engine(engine, {0: [a.request("a"), b.request("b", greedy(7)), c.request("c", greedy(11))]})
    assert res.tokens["a"] == a.ref and res.tokens["b"] == b.ref[:7] and res.tokens["c"] == c.ref[:11]
    assert max(seen) == 1 and seen[:3] == [1, 1, 1]  # one new prompt per step, not three in the first


@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_recomputes_with_same_embeddings(family):
    case = get_case(family)
    a, b, c = case.prompts
    bs = 4
    blocks = cdiv(len(a.token_ids), bs) + cdiv(len(b.token_ids), bs) + 1  # a and b fit, then must grow
    longest = max(len(p.token_ids) for p in case.prompts) + REF_TOKENS
    blocks = max(blocks, cdiv(longest, bs))
    engine = LLMEngine(case.model, EngineConfig(block_size=bs, num_kv_blocks=blocks, max_num_batched_tokens=64))
    res = run_engine(engine, {0: [a.request("a"), b.request("b"), c.request("c")]})
    assert engine.kv_cache_info()["num_preemptions"] > 0
    for rid, p in zip("abc", case.prompts):
        assert res.tokens[rid] == p.ref, rid
    assert engine.kv_cache_info()["free_blocks"] == blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_cancellation_mid_batch(family):
    case = get_case(family)
    a, b, c = case.prompts
    engine = LLMEngine(case.model, EngineConfig(max_num_batched_tokens=96))
    res = run_engine(engine, {0: [a.request("a"), b.request("b"), c.request("c")]}, aborts={4: ["b"]})
    assert res.finish["b"] == "abort"
    assert res.tokens["b"] == b.ref[: len(res.tokens["b"])] and len(res.tokens["b"]) < REF_TOKENS
    assert res.tokens["a"] == a.ref and res.tokens["c"] == c.ref
    info = engine.kv_cache_info()
    assert info["free_blocks"] == info["num_blocks"]
    assert not engine.abort_request("b")  # already gone


def test_abort_waiting_request_and_limits():
    case = get_case("llava")
    a, b, _ = case.prompts
    engine = LLMEngine(case.model, EngineConfig(max_num_seqs=1, max_model_len=64))
    with pytest.raises(LimitExceededError):
        engine.add_request(a.request("long", prompt_token_ids=a.token_ids * 3))
    res = run_engine(engine, {0: [a.request("a"), b.request("b")]}, aborts={1: ["b"]})
    assert res.finish["b"] == "abort" and res.tokens["b"] == []
    assert res.tokens["a"] == a.ref
    assert engine.kv_cache_info()["free_blocks"] == engine.kv_cache_info()["num_blocks"]


def test_max_model_len_ends_with_length():
    case = get_case("qwen2_vl")
    a = case.prompts[0]
    engine = LLMEngine(case.model, EngineConfig(max_model_len=len(a.token_ids) + 5))
    res = run_engine(engine, {0: [a.request("a", SamplingParams(max_tokens=None, temperature=0.0))]})
    assert res.tokens["a"] == a.ref[:5] and res.finish["a"] == "length"


def test_kv_cache_info_fields():
    engine = LLMEngine(get_case("llava").model, EngineConfig(num_kv_blocks=32, block_size=16))
    info = engine.kv_cache_info()
    assert info["num_blocks"] == 32 and info["free_blocks"] == 32 and info["block_size"] == 16
    assert info["bytes"] == 32 * info["block_bytes"] and info["max_model_len"] == 512
