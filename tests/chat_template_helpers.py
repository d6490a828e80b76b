"""Shared by the chat-template-input tests: a template that reads what a request passes beside its messages, and
transformers' rendering of it (the oracle).

The tiny models' own templates read neither `documents` nor extra variables, so the tests serve the tiny
qwen2_vl template with three additions, in the style of RAG and "thinking" templates: a system block listing the
documents (each document's fields in order), one showing an integer variable (`max_thoughts`: over JSON and gRPC
an integer must stay an integer, "2" and not "2.0"), and Qwen3's empty think block after the generation prompt when
`enable_thinking` is false.
"""
from __future__ import annotations

import base64
from pathlib import Path

from offline_helpers import make_image, oracle_model, png_bytes

_HEAD = (
    "{%- if documents -%}{{- '<|im_start|>system\\n# Documents' -}}{%- for d in documents -%}"
    "{{- '\\n[' ~ loop.index ~ ']' -}}{%- for k, v in d.items() -%}{{- ' ' ~ k ~ ': ' ~ v -}}{%- endfor -%}"
    "{%- endfor -%}{{- '<|im_end|>\\n' -}}{%- endif -%}\n"
    "{%- if max_thoughts is defined -%}{{- '<|im_start|>system\\nthoughts: ' ~ max_thoughts ~ '<|im_end|>\\n' -}}"
    "{%- endif -%}\n"
)
_TAIL = ("\n{%- if add_generation_prompt and enable_thinking is defined and not enable_thinking -%}"
         "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}")

QUESTION = "What is in the image?"
PREFILL = "The image shows"
DOCUMENTS = [{"title": "Cats", "text": "Cats are small."}, {"text": "Dogs bark.", "title": "Dogs"}]


def rag_template(model_dir: str | Path) -> str:
    return _HEAD + (Path(model_dir) / "chat_template.jinja").read_text() + _TAIL


def image_url(seed: int) -> tuple[object, str]:
    img = make_image(seed=seed)
    return img, "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def messages(url: str, *, prefill: bool) -> list[dict]:
    """A user turn with an image (as the HTTP API takes it) and, with `prefill`, the assistant's started answer."""
    out = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": QUESTION}]}]
    return out + ([{"role": "assistant", "content": PREFILL}] if prefill else [])


def oracle_messages(*, prefill: bool) -> list[dict]:
    """The same conversation as transformers' processor takes it (one {"type": "image"} per image)."""
    out = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return out + ([{"role": "assistant", "content": PREFILL}] if prefill else [])


def oracle_text(model_dir: str | Path, template: str, *, prefill: bool, **template_inputs) -> str:
    """transformers' `processor.apply_chat_template` of the conversation with the same template inputs."""
    _, processor = oracle_model(str(model_dir))
    return processor.apply_chat_template(oracle_messages(prefill=prefill), chat_template=template, tokenize=False,
                                         **template_inputs)


def oracle_ids(model_dir: str | Path, text: str, img=None) -> list[int]:
    """The prompt's token ids as transformers makes them: the tokenizer's (one placeholder per image) without
    `img`, the processor's (each image expanded to its rows) with it."""
    _, processor = oracle_model(str(model_dir))
    if img is None:
        return processor.tokenizer(text, add_special_tokens=False).input_ids
    return processor(text=text, images=[img], add_special_tokens=False).input_ids[0]
