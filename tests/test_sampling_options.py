"""vLLM's sampling options in the engine: penalties, logit_bias, min_p, bad_words, top_logprobs and n > 1.

The processors are checked against transformers' own logits processors on the model's real logits, and the
greedy outputs with an option against `model.generate` with the matching option (the oracle), in a batch that
also holds a request without options (which must still match the plain greedy reference).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (MinPLogitsWarper, NoBadWordsLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          SequenceBiasLogitsProcessor)

from mmpipe.shared.engine import EngineConfig, LLMEngine
from mmpipe.shared.engine.logits_processors import apply_logits_processors, apply_min_p
from mmpipe.shared.engine.sequence import Sequence
from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.fanout import child_requests
from mmpipe.shared.types import EngineRequest, SamplingParams

from engine_helpers import get_case, run_engine


@pytest.fixture(scope="module")
def case():
    torch.set_num_threads(2)
    return get_case("qwen2_vl")


def _hf(case, prompt, **kw):
    out = case.model.generate(**prompt.inputs, do_sample=False, return_dict_in_generate=True, **kw)
    if hasattr(case.model.model, "rope_deltas"):
        case.model.model.rope_deltas = None
    return out


def _seq(prompt, sp: SamplingParams, output: list[int], **req_kw) -> Sequence:
    req = prompt.request("x", sp, **req_kw)
    seq = Sequence(req, max_model_len=4096, eos_token_ids=[], generator=None)
    seq.token_ids += output
    return seq


@torch.no_grad()
def test_processors_match_transformers_on_model_logits(case):
    a = case.prompts[0]
    hf = _hf(case, a, max_new_tokens=4, output_logits=True)
    out = hf.sequences[0, len(a.token_ids):].tolist()
    logits = hf.logits[-1][0].float()  # the logits after 3 generated tokens
    ids = torch.tensor([a.token_ids + out[:3]])
    vocab = logits.shape[0]
    top = int(logits.argmax())
    seqs = [_seq(a, SamplingParams(repetition_penalty=1.7), out[:3]),
            _seq(a, SamplingParams(logit_bias={top: -5.0, 7: 3.5}), out[:3]),
            _seq(a, SamplingParams(), out[:3]),  # no options: untouched
            _seq(a, SamplingParams(presence_penalty=0.6, frequency_penalty=0.9), out[:3]),
            _seq(a, SamplingParams(), out[:3], bad_words_token_ids=[[top], [out[2], 9]])]
    got = apply_logits_processors(logits.repeat(len(seqs), 1), seqs)
    want_rep = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits[None].clone())[0]
    want_bias = SequenceBiasLogitsProcessor({(top,): -5.0, (7,): 3.5})(ids, logits[None].clone())[0]
    counts = torch.bincount(torch.tensor(out[:3]), minlength=vocab).float()  # OpenAI's definition, by hand
    want_pf = logits - 0.9 * counts - 0.6 * (counts > 0).float()
    # NoBadWordsLogitsProcessor bans [top] always and [out[2], 9]'s last token after out[2]
    want_bad = NoBadWordsLogitsProcessor([[top], [out[2], 9]], eos_token_id=None)(ids, logits[None].clone())[0]
    assert torch.allclose(got[0], want_rep) and not torch.equal(want_rep, logits)
    assert torch.allclose(got[1], want_bias)
    assert torch.equal(got[2], logits)
    assert torch.allclose(got[3], want_pf)
    assert torch.equal(torch.isinf(got[4]), torch.isinf(want_bad)) and int(torch.isinf(got[4]).sum()) == 2
    for mp in (0.05, 0.3):  # min_p against MinPLogitsWarper, after a temperature
        scaled = (logits / 0.7)[None]
        want = MinPLogitsWarper(mp)(ids, scaled.clone())
        assert torch.equal(torch.isinf(apply_min_p(scaled, [mp])), torch.isinf(want))
    assert torch.equal(apply_min_p(logits[None], [0.0]), logits[None])


@torch.no_grad()
def test_greedy_with_options_equals_transformers_generate(case):
    a, b, c = case.prompts
    bias = {b.ref[1]: -30.0, b.ref[3]: -30.0}
    for pen in (1.5, 3.0, 0.3):  # the first penalty that changes this tiny model's answer
        want_rep = _hf(case, a, max_new_tokens=10, repetition_penalty=pen).sequences[0, len(a.token_ids):].tolist()
        if want_rep != a.ref[:10]:
            break
    want_bias = _hf(case, b, max_new_tokens=10, sequence_bias={(t,): v for t, v in bias.items()}
                    ).sequences[0, len(b.token_ids):].tolist()
    want_bad = _hf(case, c, max_new_tokens=10, bad_words_ids=[[c.ref[2]]]).sequences[0, len(c.token_ids):].tolist()
    g = dict(max_tokens=10, temperature=0.0)
    res = run_engine(LLMEngine(case.model, EngineConfig()), {0: [
        a.request("rep", SamplingParams(repetition_penalty=pen, **g)),
        b.request("bias", SamplingParams(logit_bias=bias, **g)),
        c.request("bad", SamplingParams(**g), bad_words_token_ids=[[c.ref[2]]]),
        a.request("plain", SamplingParams(**g))]})
    assert want_rep != a.ref[:10] and want_bias != b.ref[:10]  # the options change the answer
    assert res.tokens["rep"] == want_rep[:len(res.tokens["rep"])] and len(res.tokens["rep"]) >= 1
    assert res.tokens["bias"] == want_bias[:len(res.tokens["bias"])]
    assert res.tokens["bad"] == want_bad[:len(res.tokens["bad"])] and c.ref[2] not in res.tokens["bad"]
    assert res.tokens["plain"] == a.ref[:10]


@torch.no_grad()
def test_top_logprobs_are_a_log_softmax_top_k_of_model_logits(case):
    a = case.prompts[1]
    hf = _hf(case, a, max_new_tokens=5, output_logits=True)
    engine = LLMEngine(case.model, EngineConfig())
    engine.add_request(a.request("t", SamplingParams(max_tokens=5, temperature=0.0, logprobs=5)))
    engine.add_request(a.request("z", SamplingParams(max_tokens=5, temperature=0.0, logprobs=0)))
    tops: dict[str, list] = {"t": [], "z": []}
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert (o.top_logprobs is None) == (o.request_id == "z")
            tops[o.request_id] += o.top_logprobs or []
    assert len(tops["t"]) == min(5, len(a.ref))
    for step, alts in enumerate(tops["t"]):
        lsm = torch.log_softmax(hf.logits[step][0].float(), -1)
        vals, ids = lsm.topk(5)
        assert [t for t, _ in alts] == ids.tolist()
        assert [v for _, v in alts] == pytest.approx(vals.tolist(), abs=1e-4)


def test_n2_seeded_samples_are_distinct_reproducible_and_share_the_prompt(case):
    a = case.prompts[0]
    L = len(a.token_ids)
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=7, n=2)

    def run():
        engine = LLMEngine(case.model, EngineConfig(block_size=16))
        kids = child_requests(a.request("r", sp, mm_spans=a.mm_spans()))
        res = run_engine(engine, {0: kids})
        return [res.tokens[k.request_id] for k in kids], engine.stats, [res.cached[k.request_id] for k in kids]

    (s0, s1), stats, cached = run()
    assert s0 != s1  # seeds 7 and 8
    assert run()[0] == [s0, s1]
    alone = run_engine(LLMEngine(case.model, EngineConfig()),
                       {0: [a.request("one", dataclasses.replace(sp, n=1, seed=8))]}).tokens["one"]
    assert alone == s1  # sample 1 is the seed + 1 request
    # the prompt is computed once: the second sample takes its full blocks from the first one's
    shared = (L - 1) // 16 * 16
    assert cached == [0, shared] and shared > 0
    assert stats["prefill_tokens"] == L + (L - shared)


def test_validation_names_the_field(case):
    for kw, field in ((dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=float("nan")),
                      "frequency_penalty"), (dict(repetition_penalty=0.0), "repetition_penalty"),
                      (dict(min_p=1.5), "min_p"), (dict(logprobs=21), "logprobs"), (dict(n=0), "n"),
                      (dict(logit_bias={"x": 1.0}), "logit_bias"), (dict(logit_bias={3: float("inf")}), "logit_bias"),
                      (dict(prompt_logprobs=-1), "prompt_logprobs"), (dict(bad_words=[""]), "bad_words")):
        with pytest.raises(InvalidInputError) as e:
            SamplingParams(**kw)
        assert e.value.param == field
    assert SamplingParams(logit_bias={"5": 2}).logit_bias == {5: 2.0}
    engine = LLMEngine(case.model, EngineConfig())
    vocab = engine.runner.decoder.vocab_size
    with pytest.raises(InvalidInputError) as e:
        engine.add_request(case.prompts[0].request("v", SamplingParams(logit_bias={vocab: 1.0})))
    assert e.value.param == "logit_bias"
    with pytest.raises(InvalidInputError) as e:
        engine.add_request(EngineRequest("w", [1, 2], SamplingParams(), bad_words_token_ids=[[vocab + 3]]))
    assert e.value.param == "bad_words"


@torch.no_grad()
def test_prompt_logprobs_are_the_model_logits_at_prompt_positions(case):
    """Token i of the prompt, given the ones before it: the log-softmax of the model's logits at position i - 1,
    across prefill chunks, with the top alternatives; prefix caching does not skip them."""
    a = case.prompts[2]
    fwd = case.model(**a.inputs)
    if hasattr(case.model.model, "rope_deltas"):
        case.model.model.rope_deltas = None
    lsm = torch.log_softmax(fwd.logits[0].float(), -1)
    ids = a.token_ids
    engine = LLMEngine(case.model, EngineConfig(block_size=16, max_num_batched_tokens=24))
    sp = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    got = {}
    for rid in ("first", "again"):  # the second would hit the prefix cache without prompt_logprobs
        engine.add_request(a.request(rid, sp, mm_spans=a.mm_spans()))
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.prompt_logprobs is not None:
                    got[rid] = o.prompt_logprobs
    assert got["first"] == got["again"] and len(got["first"]) == len(ids) and got["first"][0] is None
    for i, (tid, lp, rank, alts) in enumerate(got["first"][1:], start=1):
        assert tid == ids[i]
        assert lp == pytest.approx(lsm[i - 1, ids[i]].item(), abs=1e-4)
        assert rank == int((lsm[i - 1] > lsm[i - 1, ids[i]]).sum()) + 1
        vals, top = lsm[i - 1].topk(3)
        assert [t for t, _ in alts] == top.tolist()
        assert [v for _, v in alts] == pytest.approx(vals.tolist(), abs=1e-4)
