"""Sampling settings through the engine: seeds, top_k / top_p, min_tokens, stop ids, ignore_eos, logprobs."""
from __future__ import annotations

import pytest
import torch

from mmpipe.shared.engine import EngineConfig, LLMEngine
from mmpipe.shared.engine.sampler import Sampler, _apply_top_k_top_p
from mmpipe.shared.types import SamplingParams

from engine_helpers import get_case, run_engine


@pytest.fixture(scope="module")
def case():
    torch.set_num_threads(2)
    return get_case("qwen2_vl")


def _run(case, reqs_by_step, **cfg):
    return run_engine(LLMEngine(case.model, EngineConfig(**cfg)), reqs_by_step)


def _first_new(ref: list[int], start: int = 1) -> int:
    """An index k >= start whose token does not occur before it (stopping there is unambiguous)."""
    for k in range(start, len(ref)):
        if ref[k] not in ref[:k]:
            return k
    raise AssertionError("no usable token")


def test_seeded_sampling_is_independent_of_batch_mates(case):
    a, b, c = case.prompts
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    alone = _run(case, {0: [a.request("x", sp)]}).tokens["x"]
    mates = _run(case, {0: [b.request("m1", SamplingParams(max_tokens=20, temperature=0.8, seed=5)),
                            c.request("m2", SamplingParams(max_tokens=20, temperature=1.2))],
                        2: [a.request("x", sp)]}, max_num_batched_tokens=40).tokens["x"]
    assert alone == mates
    other_seed = _run(case, {0: [a.request("x", SamplingParams(max_tokens=12, temperature=1.0, seed=99))]})
    assert other_seed.tokens["x"] != alone  # the seed matters (12 tokens from a 480-word vocab)


def test_top_k_1_equals_greedy(case):
    a, b, _ = case.prompts
    res = _run(case, {0: [a.request("a", SamplingParams(max_tokens=16, temperature=1.5, top_k=1)),
                          b.request("b", SamplingParams(max_tokens=16, temperature=0.7, top_k=1, seed=3))]})
    assert res.tokens["a"] == a.ref and res.tokens["b"] == b.ref


def test_stop_token_ids_and_min_tokens(case):
    a = case.prompts[0]
    k = _first_new(a.ref)
    stop = a.ref[k]
    res = _run(case, {0: [a.request("s", SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[stop]))]})
    assert res.tokens["s"] == a.ref[: k + 1] and res.finish["s"] == "stop"
    # min_tokens holds the stop id back: the first k+1 tokens cannot contain it, and it still stops later.
    res = _run(case, {0: [a.request("m", SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[stop],
                                                        min_tokens=k + 2))]})
    out = res.tokens["m"]
    assert stop not in out[: k + 2] and len(out) >= k + 2
    assert out[:k] == a.ref[:k]
    assert res.finish["m"] == ("stop" if out[-1] == stop else "length")


def test_eos_and_ignore_eos(case):
    a = case.prompts[1]
    k = _first_new(a.ref, start=2)
    eos = [a.ref[k]]
    res = _run(case, {0: [a.request("e", eos_token_ids=eos),
                          a.request("i", SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
                                    eos_token_ids=eos)]})
    assert res.tokens["e"] == a.ref[: k + 1] and res.finish["e"] == "stop"
    assert res.tokens["i"] == a.ref and res.finish["i"] == "length"


def test_min_tokens_suppresses_eos(case):
    a = case.prompts[2]
    eos = [a.ref[0]]  # would stop at once
    res = _run(case, {0: [a.request("e", SamplingParams(max_tokens=8, temperature=0.0, min_tokens=4),
                                    eos_token_ids=eos)]})
    assert len(res.tokens["e"]) >= 4 and eos[0] not in res.tokens["e"][:4]


@torch.no_grad()
def test_logprobs_are_log_softmax_of_hf_logits(case):
    a = case.prompts[0]
    hf = case.model.generate(**a.inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    if hasattr(case.model.model, "rope_deltas"):
        case.model.model.rope_deltas = None
    res = _run(case, {0: [a.request("a", SamplingParams(max_tokens=6, temperature=0.0, logprobs=0)),
                          a.request("n", SamplingParams(max_tokens=6, temperature=0.0))]})
    toks = res.tokens["a"]
    assert toks == a.ref[:6]
    want = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(hf.logits, toks)]
    assert res.logprobs["a"] == pytest.approx(want, abs=1e-4)
    assert res.logprobs["n"] == []  # not asked for
    # sampled tokens report the raw logprob too (temperature does not change it)
    res = _run(case, {0: [a.request("t", SamplingParams(max_tokens=1, temperature=2.0, seed=0, logprobs=1))]})
    lp = torch.log_softmax(hf.logits[0][0].float(), -1)[res.tokens["t"][0]].item()
    assert res.logprobs["t"][0] == pytest.approx(lp, abs=1e-4)


def test_top_k_top_p_masks_rowwise():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    out = _apply_top_k_top_p(logits, top_k=[2, 4], top_p=[1.0, 0.5])
    assert torch.isinf(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()
    p = torch.softmax(logits[1], -1)  # [0.032, 0.087, 0.237, 0.644]: 0.644 alone reaches 0.5
    assert p[3] > 0.5 and torch.isfinite(out[1, 3]) and torch.isinf(out[1, :3]).all()


def test_sampling_follows_the_distribution():
    """The exponential race draws from softmax(logits / T): check frequencies on a 3-token vocab."""
    from types import SimpleNamespace

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    seqs = [SimpleNamespace(want_logprobs=False, suppress_ids=[], num_output_tokens=0, generator=None,
                            sampling=SamplingParams(temperature=1.0), has_penalties=False, logit_bias_ids=None,
                            bad_words_token_ids=[], num_top_logprobs=0) for _ in range(4000)]
    torch.manual_seed(0)
    toks = torch.tensor(Sampler()(logits, seqs).token_ids)
    freq = torch.bincount(toks, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)
