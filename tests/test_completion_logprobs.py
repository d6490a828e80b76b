"""The legacy completion logprobs writer (services/gateway/openai/completion/logprobs.py) on the tiny model's real
tokenizer: a whole answer written in one piece equals the same tokens written in stream pieces, concatenated
(tokens, token_logprobs, top_logprobs, text_offset), with the echoed prompt first; a piece's chunk JSON is what
pydantic writes for the same values. The served stream is checked end to end in test_gateway_e2e.py."""
from __future__ import annotations

import json
import math

import pytest

from mmpipe.services.gateway.openai.completion.logprobs import (
    LogprobsWriter, chunk_json, output_entries, prompt_entries,
)
from mmpipe.services.gateway.openai.completion.protocol import CompletionChoice, CompletionLogprobs


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from mmpipe.shared.models.tiny import ensure_tiny_model

    return AutoTokenizer.from_pretrained(str(ensure_tiny_model("qwen2_5_omni")))


def _concat(pieces: list[CompletionLogprobs]) -> dict:
    return {f: [x for p in pieces for x in (getattr(p, f) or [])]
            for f in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def test_pieces_concatenate_to_the_whole_with_the_prompt_first(tok):
    prompt = tok("The quick brown fox é").input_ids
    # GenerationStream's prompt logprobs: None first, then (id, logprob, rank, alternatives)
    plps = [None] + [(t, -0.5 - i, 1 + i, [(t, -0.5 - i), (7, -3.0)]) for i, t in enumerate(prompt[1:])]
    out = tok(" jumps over the lazy dog").input_ids
    lps = [-0.1 * (i + 1) for i in range(len(out))]
    tops = [[(t, lp), (11, lp - 1)] for t, lp in zip(out, lps)]
    entries = [*prompt_entries(prompt, plps), *output_entries(out, lps, tops)]
    whole = LogprobsWriter(tok, with_tops=True).write(entries)

    assert whole.tokens == [tok.decode([t]) for t in prompt + out]
    assert whole.token_logprobs[0] is None and whole.top_logprobs[0] is None
    assert whole.token_logprobs[1:] == [e[1] for e in plps[1:]] + lps
    assert whole.top_logprobs[1] == {tok.decode([prompt[1]]): -0.5, tok.decode([7]): -3.0}
    assert whole.text_offset == [sum(len(s) for s in whole.tokens[:i]) for i in range(len(whole.tokens))]

    # a stream: the prompt with the first generated token, then one token at a time, then two
    w = LogprobsWriter(tok, with_tops=True)
    n = len(prompt)
    cuts = [0, n + 1, *range(n + 2, len(entries) - 2), len(entries)]
    pieces = [w.write(entries[a:b]) for a, b in zip(cuts, cuts[1:])]
    assert _concat(pieces) == _concat([whole])


def test_without_prompt_logprobs_and_without_alternatives(tok):
    ids = tok("Hi").input_ids[:1]
    assert prompt_entries(ids, None) == [(ids[0], None, None)]  # a one-token prompt has no prompt logprobs
    lp = LogprobsWriter(tok, with_tops=False).write([*prompt_entries(ids, None), *output_entries([5, 6], [-1.0, -2.0],
                                                                                                  None)])
    assert lp.top_logprobs is None and lp.token_logprobs == [None, -1.0, -2.0]
    with pytest.raises(ValueError):  # prompt logprobs of another prompt are a bug, never a silent misalignment
        prompt_entries(ids + ids, [None])


def test_chunk_json_is_what_pydantic_writes(tok):
    from mmpipe.services.gateway.http.sse import finite

    ids = tok("a b").input_ids
    entries = [*prompt_entries(ids, [None] * len(ids)), *output_entries([9, 10], [-0.25, -math.inf],
                                                                        [[(9, -0.25)], [(10, -math.inf)]])]
    for with_tops in (True, False):
        lp = LogprobsWriter(tok, with_tops).write(entries)
        got = {"index": 0, "text": "x", "logprobs": chunk_json(lp, finite)}
        want = CompletionChoice(index=0, text="x", logprobs=lp).model_dump_json(exclude_none=True)
        assert json.dumps(got, ensure_ascii=False, separators=(",", ":")) == want
