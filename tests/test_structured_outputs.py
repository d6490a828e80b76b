"""Structured outputs (issue 11): with a tiny random model whose free text is random words, the grammar alone
makes every constrained answer valid. Offline through LLM.generate / LLM.chat; served through the `openai`
client against a real generator process and gateway (streaming and not); invalid specs are 400s naming the
field; fields that would change the answer and are not implemented are 400s naming them (item 1); a chat
request without max_tokens runs to what is left of the context (item 2)."""
from __future__ import annotations

import json
import logging
import re

import jsonschema
import openai
import pytest

from mmpipe import SamplingParams, StructuredOutputsParams
from mmpipe.shared.errors import InvalidInputError

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "ok": {"type": "boolean"}},
    "required": ["name", "age", "ok"], "additionalProperties": False}
REGEX = r"[a-z]{3,8}-[0-9]{2}"
CHOICES = ["yes", "no", "maybe so"]


def valid(text: str, schema=SCHEMA) -> bool:
    jsonschema.validate(json.loads(text), schema)
    return True


@pytest.fixture(scope="module")
def model_dir() -> str:
    from mmpipe.shared.models.tiny import ensure_tiny_model

    return str(ensure_tiny_model("qwen2_5_vl"))


@pytest.fixture(scope="module")
def llm(model_dir):
    from mmpipe import LLM

    return LLM(model_dir, device="cpu")


# ---- offline ---------------------------------------------------------------------------------------------
def test_offline_batch_mixes_constrained_and_free_rows(llm):
    so = StructuredOutputsParams
    sps = [SamplingParams(temperature=1.0, seed=i, max_tokens=96, structured_outputs=so(json=SCHEMA))
           for i in range(4)]
    sps += [SamplingParams(temperature=1.0, seed=7, max_tokens=32, structured_outputs=so(regex=REGEX)),
            SamplingParams(temperature=1.0, seed=8, max_tokens=32, structured_outputs=so(choice=CHOICES)),
            SamplingParams(temperature=0.9, seed=9, max_tokens=64, structured_outputs=so(json_object=True)),
            SamplingParams(temperature=0.0, max_tokens=12),
            SamplingParams(temperature=1.0, seed=3, max_tokens=32,
                           structured_outputs={"grammar": 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,3}/'})]
    outs = [o.outputs[0] for o in llm.generate(["Tell me something"] * len(sps), sps, use_tqdm=False)]
    for o in outs[:4]:
        assert valid(o.text) and o.finish_reason == "stop", o
    assert re.fullmatch(REGEX, outs[4].text) and outs[4].finish_reason == "stop"
    assert outs[5].text in CHOICES and outs[5].finish_reason == "stop"
    assert isinstance(json.loads(outs[6].text), dict) and outs[6].finish_reason == "stop"
    assert re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", outs[8].text), outs[8]
    # the free greedy row is token-identical to the same request alone: grammars never touch other rows
    alone = llm.generate(["Tell me something"], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    assert alone[0].outputs[0].token_ids == outs[7].token_ids
    # and without a grammar the random model does not produce JSON (the constraint is what makes it valid)
    free = llm.generate(["Tell me something"], SamplingParams(temperature=1.0, seed=0, max_tokens=40), use_tqdm=False)
    with pytest.raises(ValueError):
        json.loads(free[0].outputs[0].text)


def test_offline_chat_with_schema_and_greedy(llm):
    msgs = [{"role": "user", "content": "Give me a person as JSON."}]
    for temp in (0.0, 1.0):
        out = llm.chat(msgs, SamplingParams(temperature=temp, seed=1, max_tokens=96,
                                            structured_outputs=StructuredOutputsParams(json=json.dumps(SCHEMA))),
                       use_tqdm=False)[0].outputs[0]
        assert valid(out.text) and out.finish_reason == "stop"


@pytest.mark.parametrize("spec, param, needle", [
    ({"json": {"type": "object", "not": {"required": ["a"]}}}, "structured_outputs.json", "not"),
    ({"json": {"type": "strin"}}, "structured_outputs.json", "strin"),
    ({"regex": "(?=a)a+"}, "structured_outputs.regex", "look"),
    ({"regex": "a("}, "structured_outputs.regex", ""),
    ({"grammar": "start: undefined_rule"}, "structured_outputs.grammar", ""),
    ({"choice": []}, "structured_outputs.choice", ""),
    ({"json": {"type": "object"}, "regex": "a"}, "structured_outputs", "exactly one"),
])
def test_offline_invalid_specs_fail_before_work(llm, spec, param, needle):
    with pytest.raises(InvalidInputError) as ei:
        llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=spec), use_tqdm=False)
    assert ei.value.param == param and needle in ei.value.message


def test_grammar_mask_handles_logits_wider_than_the_tokenizer():
    import torch

    from mmpipe.shared.structured.masks import GrammarMask, apply_grammar_mask

    logits = torch.zeros(3, 70)
    bits = torch.zeros(1, 2, dtype=torch.int32)  # a 64-token tokenizer: tokens 64..69 are padding
    bits[0, 0] = 0b101  # tokens 0 and 2
    out = apply_grammar_mask(logits, GrammarMask([1], bits))
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [0, 2]
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])


def test_prefetched_masks_are_used_only_for_the_state_they_were_made_for(model_dir):
    """The next masks are computed in the background after each step; a request whose matcher moved on since
    (or a slot handed to a new request) gets its mask recomputed, so every row's mask is its matcher's own."""
    import types

    import numpy as np
    from transformers import AutoTokenizer

    from mmpipe.shared.structured.masks import StructuredOutputs

    tok = AutoTokenizer.from_pretrained(model_dir)
    so = StructuredOutputs(tok, len(tok) + 5)
    specs = [StructuredOutputsParams(json=SCHEMA), StructuredOutputsParams(regex="(ab|cd)+e"),
             StructuredOutputsParams(choice=["yes, certainly", "no, never"])]

    def seq(i, spec):
        s = types.SimpleNamespace(request_id=str(i), sampling=types.SimpleNamespace(structured_outputs=spec),
                                  eos_token_ids=frozenset({tok.eos_token_id}), grammar=None, is_finished=False)
        so.add(s)
        return s

    def check(batch):
        mask = so.fill(batch)
        for k, row in enumerate(mask.rows):
            want = np.frombuffer(batch[row].grammar.compute_bitmask(), dtype=np.uint32).copy()
            if batch[row].grammar.is_accepting():  # the request's own EOS is allowed where the grammar may end
                e = tok.eos_token_id
                want[e >> 5] |= np.uint32(1 << (e & 31))
            assert np.array_equal(mask.bits[mask.slots[k]].numpy().view(np.uint32), want), batch[row].request_id
        return mask

    seqs = [seq(i, sp) for i, sp in enumerate(specs)]
    check(seqs)
    for step in range(3):
        pairs = []
        for s in seqs:
            bits = np.unpackbits(np.frombuffer(s.grammar.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = [int(t) for t in bits.nonzero()[0] if t != tok.eos_token_id]
            pairs.append((s, allowed[step % len(allowed)]))
        done = so.advance(pairs)
        for s in seqs:
            s.is_finished = id(s) in done
        so.prefetch(seqs[:2])  # the third is not prefetched: its mask must be recomputed at fill
        seqs = [s for s in seqs if not s.is_finished]
        check(seqs)
    freed = seqs[0].grammar_slot
    seqs[0].is_finished = True  # its slot goes to the next request
    seqs[0] = seq(9, specs[2])
    assert seqs[0].grammar_slot == freed
    check(seqs)


def test_matchers_of_one_spec_are_independent_copies(model_dir):
    """matcher() hands out copies of one pristine matcher per grammar: each starts at the grammar's start,
    whatever the others (and the first one handed out) have consumed since."""
    from transformers import AutoTokenizer

    from mmpipe.shared.structured.grammar import GrammarCompiler

    tok = AutoTokenizer.from_pretrained(model_dir)
    compiler = GrammarCompiler(tok, len(tok))
    spec = StructuredOutputsParams(json=SCHEMA)
    whole = tok.encode(json.dumps({"name": "ab", "age": 7, "ok": True}, separators=(",", ":")),
                       add_special_tokens=False)
    first = compiler.matcher(spec)
    assert first.consume_tokens(whole) and first.is_accepting()
    second = compiler.matcher(spec)
    assert not second.is_accepting() and second.compute_bitmask() != first.compute_bitmask()
    assert second.consume_tokens(whole[:2]) and compiler.matcher(spec).validate_tokens(whole) == len(whole)
    assert compiler.matcher(StructuredOutputsParams(regex="a+")).validate_tokens(whole) == 0  # its own grammar


# ---- served --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(model_dir, redis_server):
    from mmpipe.shared.cache.embedded_redis import free_port
    from services_helpers import start_gateway_process, start_stage_process, wait_healthy

    gen = start_stage_process("generator", model_dir, redis_server)
    dead = {s: f"127.0.0.1:{free_port()}" for s in ("encoder", "ingest")}
    gw = start_gateway_process(model_dir, {"generator": gen.addr, **dead}, gen.log_path.parent,
                               ["--redis-url", redis_server, "--api-key", "k"])
    try:
        wait_healthy(gen.addr, 120, gen.proc, gen.log_path)
        _wait_ready(gw)  # /ready needs only the generator (no media stages run here)
        yield openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0), gw
    finally:
        gw.stop()
        gen.stop()


def _wait_ready(gw, timeout_s: float = 120.0) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and gw.proc.poll() is None:
        try:
            if httpx.get(f"{gw.url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"gateway not ready; log tail:\n{gw.log.read_text(errors='replace')[-3000:]}")


def _chat(client, stream=False, **kw):
    msgs = [{"role": "user", "content": "Reply in the requested format."}]
    if not stream:
        c = client.chat.completions.create(model="tiny", messages=msgs, **kw).choices[0]
        return c.message.content, c.finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(model="tiny", messages=msgs, stream=True, **kw):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True])
def test_served_structured_outputs(served, stream):
    client, _ = served
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(2):
        text, finish = _chat(client, stream, response_format=rf, temperature=1.0, seed=seed, max_tokens=96)
        assert valid(text) and finish == "stop"
    text, finish = _chat(client, stream, response_format={"type": "json_object"}, seed=3, max_tokens=64)
    assert isinstance(json.loads(text), dict) and finish == "stop"
    text, finish = _chat(client, stream, extra_body={"structured_outputs": {"regex": REGEX}}, seed=4, max_tokens=32)
    assert re.fullmatch(REGEX, text) and finish == "stop"
    text, finish = _chat(client, stream, extra_body={"structured_outputs": {"choice": CHOICES}}, seed=5)
    assert text in CHOICES and finish == "stop"
    comp = client.completions.create(model="tiny", prompt="A person:", max_tokens=96, seed=6,
                                     extra_body={"structured_outputs": {"json": SCHEMA}})
    assert valid(comp.choices[0].text) and comp.choices[0].finish_reason == "stop"


def test_served_chat_without_max_tokens_runs_past_16(served):
    client, _ = served
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       temperature=0, extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens > 16 and c.choices[0].finish_reason == "length"
    assert c.usage.prompt_tokens + c.usage.completion_tokens == 2048  # the tiny model's max_model_len


@pytest.mark.parametrize("kw, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                        "not": {}}}}},
     "response_format.json_schema.schema"),
    ({"extra_body": {"structured_outputs": {"regex": "a("}}}, "structured_outputs.regex"),
    ({"extra_body": {"structured_outputs": {"json": {"type": "strin"}}}}, "structured_outputs.json"),
    ({"response_format": {"type": "structural_tag"}}, "response_format.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    # the sampling options are implemented (tests/test_sampling_options.py): values out of vLLM's ranges are 400s
    ({"logit_bias": {"999999999": 10}}, "logit_bias"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 1000}, "n"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"extra_body": {"repetition_penalty": 0.0}}, "repetition_penalty"),
    ({"extra_body": {"mm_processor_kwargs": {"do_rescale": False}}}, "mm_processor_kwargs.do_rescale"),
    ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
    ({"extra_body": {"chat_template_kwargs": {"add_generation_prompt": False}}},
     "chat_template_kwargs.add_generation_prompt"),  # served: tests/test_chat_template_inputs_served.py
])
def test_served_refusals_name_the_field(served, kw, param):
    client, _ = served
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, **kw)
    err = ei.value.body if isinstance(ei.value.body, dict) else {}
    assert ei.value.status_code == 400 and err.get("param") == param, ei.value.body


def test_completion_logprobs_beyond_20_are_refused(served):
    client, _ = served
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model="tiny", prompt="hi", max_tokens=4, logprobs=21)
    assert ei.value.body.get("param") == "logprobs"


def test_harmless_unknown_fields_are_ignored_with_a_warning(caplog):
    from mmpipe.services.gateway.openai.chat_completion.protocol import ChatCompletionRequest

    with caplog.at_level(logging.WARNING, "mmpipe.services.gateway.openai.protocol"):
        req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                    "store": True, "metadata": {"a": "b"}, "tool_choice": "none"})
        sp = req.to_sampling()
    assert sp.max_tokens is None and sp.structured_outputs is None
    assert "store" in caplog.text and "metadata" in caplog.text
