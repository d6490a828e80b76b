"""The chat template's inputs beside the messages (vLLM's `add_generation_prompt`, `continue_final_message`,
`chat_template_kwargs`, `documents`): the rules of shared/chat/template_options.py, the one rendering path
(`apply_template`) against transformers' `processor.apply_chat_template`, and the offline `LLM.chat` against
transformers' own `model.generate` on an image prompt. The served stack: test_chat_template_inputs_served.py.
"""
from __future__ import annotations

import inspect

import pytest

from chat_template_helpers import (
    DOCUMENTS, PREFILL, QUESTION, image_url, messages, oracle_ids, oracle_text, rag_template,
)
from mmpipe.shared.chat.messages import parse_messages
from mmpipe.shared.chat.template_options import RESERVED_KWARGS, ChatTemplateOptions
from mmpipe.shared.chat.templates import apply_template
from mmpipe.shared.errors import InvalidInputError, LimitExceededError
from offline_helpers import hf_generate, oracle_model

THINK = {"enable_thinking": False, "max_thoughts": 2}
# (request's template inputs, whether the conversation ends with the assistant's started answer)
CASES = [
    ({"add_generation_prompt": False, "continue_final_message": True, "chat_template_kwargs": THINK,
      "documents": DOCUMENTS}, True),
    ({"chat_template_kwargs": THINK}, False),
    ({"add_generation_prompt": False, "documents": DOCUMENTS}, False),
    ({}, False),
]


def _oracle_kwargs(inputs: dict) -> dict:
    """The same inputs as transformers' apply_chat_template keywords."""
    kw = {"add_generation_prompt": inputs.get("add_generation_prompt", True),
          "continue_final_message": inputs.get("continue_final_message", False),
          **inputs.get("chat_template_kwargs", {})}
    if "documents" in inputs:
        kw["documents"] = inputs["documents"]
    return kw


def _options(inputs: dict) -> ChatTemplateOptions:
    return ChatTemplateOptions.of(**inputs)


# ---- the rules -----------------------------------------------------------------------------------------------
def test_reserved_names_cover_transformers_apply_chat_template():
    """Every parameter of the renderer we call is a reserved key (a new transformers parameter fails here)."""
    from transformers import PreTrainedTokenizerBase

    params = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) - {"self", "kwargs"}
    assert params <= set(RESERVED_KWARGS), params - set(RESERVED_KWARGS)
    assert {"messages", "raise_exception", "strftime_now"} <= set(RESERVED_KWARGS)


_DEEP: object = 1
for _ in range(40):
    _DEEP = [_DEEP]


@pytest.mark.parametrize("inputs, err, param", [
    ({"continue_final_message": True}, InvalidInputError, "continue_final_message"),  # add_generation_prompt's default
    ({"continue_final_message": True, "add_generation_prompt": True}, InvalidInputError, "continue_final_message"),
    ({"continue_final_message": "yes", "add_generation_prompt": False}, InvalidInputError, "continue_final_message"),
    ({"add_generation_prompt": 1}, InvalidInputError, "add_generation_prompt"),
    ({"chat_template_kwargs": "enable_thinking=false"}, InvalidInputError, "chat_template_kwargs"),
    ({"chat_template_kwargs": [["enable_thinking", False]]}, InvalidInputError, "chat_template_kwargs"),
    *[({"chat_template_kwargs": {k: 1}}, InvalidInputError, f"chat_template_kwargs.{k}")
      for k in ("messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "chat_template",
                "tokenize", "return_dict", "conversation", "raise_exception")],
    ({"chat_template_kwargs": {"": 1}}, InvalidInputError, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"x": float("nan")}}, InvalidInputError, "chat_template_kwargs.x"),
    ({"chat_template_kwargs": {"x": {"y": [1, float("inf")]}}}, InvalidInputError, "chat_template_kwargs.x.y[1]"),
    ({"chat_template_kwargs": {"x": {1: "a"}}}, InvalidInputError, "chat_template_kwargs.x"),
    ({"chat_template_kwargs": {"x": (1, 2)}}, InvalidInputError, "chat_template_kwargs.x"),
    ({"chat_template_kwargs": {"x": object()}}, InvalidInputError, "chat_template_kwargs.x"),
    ({"chat_template_kwargs": {"x": "a" * 70_000}}, LimitExceededError, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"x": list(range(40_000))}}, LimitExceededError, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"x": _DEEP}}, LimitExceededError, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"x": 10 ** 5000}}, LimitExceededError, "chat_template_kwargs.x"),
    ({"documents": {"title": "a"}}, InvalidInputError, "documents"),
    ({"documents": ["text"]}, InvalidInputError, "documents[0]"),
    ({"documents": [{"title": "a"}, {"text": 3}]}, InvalidInputError, "documents[1].text"),
    ({"documents": [{"text": {"nested": "no"}}]}, InvalidInputError, "documents[0].text"),
    ({"documents": [{"t": "x"}] * 129}, LimitExceededError, "documents"),
    ({"documents": [{"text": "a" * (1 << 20)}]}, LimitExceededError, "documents"),
])
def test_bad_template_inputs_are_400s_naming_the_field(inputs, err, param):
    with pytest.raises(err) as ei:
        ChatTemplateOptions.of(**inputs)
    assert ei.value.param == param and ei.value.http_status == 400, ei.value.message


def test_good_inputs_keep_their_values_and_order():
    o = ChatTemplateOptions.of(add_generation_prompt=False, continue_final_message=True,
                               chat_template_kwargs={"enable_thinking": False, "n": 2, "x": {"a": [1.5, None, "s"]},
                                                     "bos_token": "<s>"},  # special tokens may be overridden
                               documents=DOCUMENTS)
    assert o.render_kwargs() == {"enable_thinking": False, "n": 2, "x": {"a": [1.5, None, "s"]}, "bos_token": "<s>",
                                 "add_generation_prompt": False, "continue_final_message": True,
                                 "documents": DOCUMENTS}
    assert [list(d) for d in o.documents] == [["title", "text"], ["text", "title"]]
    assert ChatTemplateOptions.of() == ChatTemplateOptions()
    assert ChatTemplateOptions().render_kwargs() == {"add_generation_prompt": True, "continue_final_message": False,
                                                     "documents": None}


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MMPIPE_CHAT_TEMPLATE_KWARGS_MAX_BYTES", "16")
    monkeypatch.setenv("MMPIPE_CHAT_DOCUMENTS_MAX_COUNT", "1")
    ChatTemplateOptions.of(chat_template_kwargs={"a": "1234"})  # {"a":"1234"}: 12 bytes
    with pytest.raises(LimitExceededError, match="MMPIPE_CHAT_TEMPLATE_KWARGS_MAX_BYTES"):
        ChatTemplateOptions.of(chat_template_kwargs={"a": "123456789"})
    with pytest.raises(LimitExceededError, match="MMPIPE_CHAT_DOCUMENTS_MAX_COUNT"):
        ChatTemplateOptions.of(documents=[{}, {}])
    monkeypatch.setenv("MMPIPE_CHAT_DOCUMENTS_MAX_BYTES", "lots")
    with pytest.raises(InvalidInputError) as ei:
        ChatTemplateOptions.of(documents=[{}])
    assert ei.value.param == "MMPIPE_CHAT_DOCUMENTS_MAX_BYTES"


@pytest.mark.parametrize("last, needle", [
    ({"role": "user", "content": "go on"}, "'user'"),
    ({"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]}, "text"),
])
def test_continue_final_message_needs_the_assistants_text(qwen2_vl_dir, last, needle):
    _, processor = oracle_model(qwen2_vl_dir)
    chat = parse_messages([{"role": "user", "content": "hi"}, last])
    o = ChatTemplateOptions.of(continue_final_message=True, add_generation_prompt=False)
    with pytest.raises(InvalidInputError, match=needle) as ei:
        apply_template(processor, rag_template(qwen2_vl_dir), chat.conversation, options=o)
    assert ei.value.param == "continue_final_message"


@pytest.mark.parametrize("template, kw", [
    ("{{ 10 / n }}", {"n": 0}),  # ZeroDivisionError
    ("{{ n + 1 }}", {"n": "a"}),  # TypeError
    ("{{ raise_exception('refused: ' ~ n) }}", {"n": 1}),  # the template's own refusal
])
def test_a_template_failing_on_a_kwarg_is_a_400(qwen2_vl_dir, template, kw):
    _, processor = oracle_model(qwen2_vl_dir)
    chat = parse_messages([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidInputError) as ei:
        apply_template(processor, template, chat.conversation, options=ChatTemplateOptions.of(chat_template_kwargs=kw))
    assert ei.value.param == "messages"


# ---- the rendering path against transformers ---------------------------------------------------------------------
@pytest.mark.parametrize("inputs, prefill", CASES)
def test_apply_template_is_transformers_rendering(qwen2_vl_dir, inputs, prefill):
    """The gateway's and LLM.chat's rendering equals processor.apply_chat_template with the same inputs, text and
    token ids (an image part in the conversation); the template really read them."""
    _, processor = oracle_model(qwen2_vl_dir)
    template = rag_template(qwen2_vl_dir)
    _, url = image_url(seed=1)
    got = apply_template(processor, template, parse_messages(messages(url, prefill=prefill)).conversation,
                         options=_options(inputs))
    want = oracle_text(qwen2_vl_dir, template, prefill=prefill, **_oracle_kwargs(inputs))
    assert got == want
    assert processor.tokenizer(got, add_special_tokens=False).input_ids == oracle_ids(qwen2_vl_dir, want)
    assert ("[2] text: Dogs bark. title: Dogs" in got) == ("documents" in inputs)
    assert ("thoughts: 2<|im_end|>" in got) == ("chat_template_kwargs" in inputs)
    assert got.endswith(PREFILL) == prefill  # the final turn left open: no <|im_end|> after it
    assert got.endswith("<think>\n\n</think>\n\n") == (inputs.get("add_generation_prompt", True)
                                                       and "chat_template_kwargs" in inputs)


# ---- offline -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(qwen2_vl_dir):
    from mmpipe import LLM

    return LLM(qwen2_vl_dir, device="cpu")


@pytest.mark.parametrize("inputs, prefill", CASES[:2])
def test_offline_chat_matches_transformers(llm, qwen2_vl_dir, inputs, prefill):
    """LLM.chat(chat_template_kwargs=, continue_final_message=, add_generation_prompt=, documents=) on an image
    prompt: the prompt is transformers' rendering, its ids the processor's, the greedy tokens transformers' own
    model.generate."""
    from mmpipe import SamplingParams

    template = rag_template(qwen2_vl_dir)
    img, url = image_url(seed=2)
    out = llm.chat(messages(url, prefill=prefill), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                   use_tqdm=False, chat_template=template, **inputs)[0]
    text = oracle_text(qwen2_vl_dir, template, prefill=prefill, **_oracle_kwargs(inputs))
    assert out.prompt == text
    assert out.prompt_token_ids == oracle_ids(qwen2_vl_dir, text, img)
    assert out.outputs[0].token_ids == hf_generate(qwen2_vl_dir, text, images=[img], add_special_tokens=False,
                                                   max_new_tokens=6)


@pytest.mark.parametrize("kw, param", [
    ({"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt defaults to True
    ({"continue_final_message": True, "add_generation_prompt": False}, "continue_final_message"),  # last: user
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools"),
    ({"documents": [{"title": None}]}, "documents[0].title"),
])
def test_offline_chat_refuses_what_the_server_refuses(llm, kw, param):
    from mmpipe import SamplingParams

    with pytest.raises(InvalidInputError) as ei:
        llm.chat([{"role": "user", "content": QUESTION}], SamplingParams(max_tokens=2), use_tqdm=False, **kw)
    assert ei.value.param == param
    assert llm.chat([{"role": "user", "content": QUESTION}], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs
