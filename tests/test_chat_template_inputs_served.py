"""The chat template's inputs (`chat_template_kwargs`, `continue_final_message`, `add_generation_prompt`,
`documents`) through the served stack: the official `openai` client (extra_body), POST /tokenize and the public gRPC
client (`mmpipe.client`) against `mmpipe gateway --chat-template <a template that reads them>` in front of the
session's ingest / encoder / generator processes (tiny qwen2_vl), with an image in the conversation. The oracle is
transformers: `processor.apply_chat_template` for the prompt, its tokenizer / processor for the ids, and
`model.generate` for the greedy answer. Bad inputs are 400s naming the field, and the gateway keeps serving.
"""
from __future__ import annotations

import httpx
import openai
import pytest
from services_helpers import start_gateway_process

from chat_template_helpers import (
    DOCUMENTS, PREFILL, QUESTION, image_url, messages, oracle_ids, oracle_text, rag_template,
)
from mmpipe.shared.errors import InvalidInputError
from offline_helpers import hf_generate

THINK = {"enable_thinking": False, "max_thoughts": 2}
CONTINUE = {"add_generation_prompt": False, "continue_final_message": True, "chat_template_kwargs": THINK,
            "documents": DOCUMENTS}
NEW_TURN = {"chat_template_kwargs": THINK, "documents": DOCUMENTS}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def template(qwen2_vl_dir) -> str:
    return rag_template(qwen2_vl_dir)


@pytest.fixture(scope="module")
def gateway(stage_stack, qwen2_vl_dir, template, tmp_path_factory):
    d = tmp_path_factory.mktemp("gw-template-inputs")
    path = d / "rag_thinking.jinja"
    path.write_text(template)
    addrs = {"ingest": stage_stack.ingest_addr, "encoder": stage_stack.encoder_addr,
             "generator": stage_stack.generator_addr}
    gw = start_gateway_process(qwen2_vl_dir, addrs, d, ["--shutdown-grace-s", "5", "--chat-template", str(path)])
    try:
        gw.wait_healthy()
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0, timeout=120)


def _oracle(qwen2_vl_dir, template, inputs: dict, prefill: bool) -> str:
    return oracle_text(qwen2_vl_dir, template, prefill=prefill,
                       add_generation_prompt=inputs.get("add_generation_prompt", True),
                       continue_final_message=inputs.get("continue_final_message", False),
                       documents=inputs.get("documents"), **inputs.get("chat_template_kwargs", {}))


@pytest.mark.parametrize("inputs, prefill, seed", [(CONTINUE, True, 11), (NEW_TURN, False, 12)])
def test_openai_client_and_tokenize_match_transformers(client, gateway, qwen2_vl_dir, template, inputs, prefill, seed):
    img, url = image_url(seed)
    text = _oracle(qwen2_vl_dir, template, inputs, prefill)
    assert ("thoughts: 2<|im_end|>" in text and "[2] text: Dogs bark. title: Dogs" in text
            and text.endswith(PREFILL if prefill else "<think>\n\n</think>\n\n"))  # the template read them all
    want_ids = oracle_ids(qwen2_vl_dir, text)  # one placeholder per image: what the gateway sends the generator
    msgs = messages(url, prefill=prefill)
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0,
                                       extra_body={**inputs, "return_token_ids": True, "ignore_eos": True})
    assert r.prompt_token_ids == want_ids
    assert r.usage.prompt_tokens == len(oracle_ids(qwen2_vl_dir, text, img))  # the image expanded to its rows
    assert r.choices[0].token_ids == hf_generate(qwen2_vl_dir, text, images=[img], add_special_tokens=False,
                                                 max_new_tokens=6)
    t = httpx.post(f"{gateway.url}/tokenize", json={"model": "tiny", "messages": msgs, **inputs}, timeout=60)
    assert t.status_code == 200, t.text
    assert t.json()["tokens"] == want_ids


def test_grpc_client_matches_transformers(gateway, qwen2_vl_dir, template):
    """The public gRPC API: the same ids as HTTP for the same inputs (a plain-text message is a text part there,
    which the template renders alike; the integer kwarg stays an integer)."""
    from mmpipe.client import MMPipeClient

    img, url = image_url(13)
    text = _oracle(qwen2_vl_dir, template, CONTINUE, True)
    with MMPipeClient(gateway.grpc_addr) as c:
        tok = c.tokenize(messages=messages(url, prefill=True), **CONTINUE)
        r = c.chat(messages(url, prefill=True), max_tokens=6, temperature=0, ignore_eos=True, **CONTINUE)
        with pytest.raises(InvalidInputError) as ei:
            c.chat(messages(url, prefill=True), max_tokens=2, continue_final_message=True)
        assert ei.value.param == "continue_final_message"
        with pytest.raises(InvalidInputError) as ei:
            c.tokenize(messages=HI, chat_template_kwargs={"documents": []})
        assert ei.value.param == "chat_template_kwargs.documents"
        with pytest.raises(InvalidInputError) as ei:
            c.tokenize(prompt="hi", documents=DOCUMENTS)
        assert ei.value.param == "documents"
        assert c.tokenize(messages=HI).count > 0  # still serving
    assert tok.tokens == oracle_ids(qwen2_vl_dir, text)
    assert r.usage["prompt_tokens"] == len(oracle_ids(qwen2_vl_dir, text, img))
    assert r.token_ids == hf_generate(qwen2_vl_dir, text, images=[img], add_special_tokens=False, max_new_tokens=6)


@pytest.mark.parametrize("extra, param", [
    ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs.add_generation_prompt"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
    ({"chat_template_kwargs": {"x": "y" * 70_000}}, "chat_template_kwargs"),
    ({"documents": "Cats are small."}, "documents"),
    ({"documents": [{"title": "Cats", "year": 1999}]}, "documents[0].year"),
    ({"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt defaults to true
    ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    ({"continue_final_message": True, "add_generation_prompt": False}, "continue_final_message"),  # last: user
    ({"continue_final_message": "sometimes", "add_generation_prompt": False}, "continue_final_message"),
])
def test_bad_template_inputs_are_400s_and_the_server_keeps_serving(client, gateway, extra, param):
    _, url = image_url(14)
    msgs = messages(url, prefill=False)
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, extra_body=extra)
    assert ei.value.status_code == 400 and ei.value.body.get("param") == param, ei.value.body
    t = httpx.post(f"{gateway.url}/tokenize", json={"messages": msgs, **extra}, timeout=60)
    assert t.status_code == 400 and t.json()["error"]["param"] == param, t.text
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")
