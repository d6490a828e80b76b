"""What a chat request hands the chat template besides its messages and tools, validated once into
`ChatTemplateOptions`: vLLM's `add_generation_prompt`, `continue_final_message`, `chat_template_kwargs` and
`documents`. The HTTP models, the public gRPC servicer and the offline `LLM.chat` each build one from their own wire
shapes; `templates.apply_template` (the one rendering path) takes only this type and never re-checks it.

The rules (vLLM's; where vLLM leaves a case to transformers' `apply_chat_template`, the same case is a 400 here,
before the template runs):

- `continue_final_message` and `add_generation_prompt` cannot both be true. `add_generation_prompt` defaults to
  true, so continuing the final message needs `add_generation_prompt=false` too, as in vLLM (whose request model
  and transformers refuse the pair). transformers then renders the conversation and cuts it right after the final
  message's text, so the template's end-of-turn (`<|im_end|>` ...) is left out and the model continues that text.
  The final message must be the assistant's and carry text (a string, or a list with a text part; transformers
  continues the last text part) -- transformers would continue any role; continuing a user's turn is never what a
  chat client means, so it is refused, naming `continue_final_message`. transformers 5 also takes a string (the
  message field to continue, e.g. "reasoning_content"); vLLM's field is a boolean, and so is this one.
- `chat_template_kwargs`: an object whose values are JSON values (objects with string keys, arrays, strings,
  finite numbers, booleans, null), passed to the template as extra variables (`apply_chat_template(**kwargs)`),
  e.g. `{"enable_thinking": false}`. A key in `RESERVED_KWARGS` is a 400 naming `chat_template_kwargs.<key>`:
  those are what the renderer itself passes or defines (vLLM refuses only `chat_template` and `tokenize` and lets
  the others override the request's own fields; here one field has one meaning, so `add_generation_prompt` inside
  the kwargs cannot bypass the rule above). The special-token variables (`bos_token`, `eos_token`, ...) may be
  overridden, as transformers and vLLM allow. Bounded: compact JSON size and nesting depth (`TemplateInputLimits`).
- `documents`: a list of objects of string values (transformers' RAG input, e.g. `{"title": ..., "text": ...}`),
  passed as `documents=`; key order is kept (templates iterate over `document.items()`). Bounded: count and bytes.

Pure Python (no torch, no transformers).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from mmpipe.shared.env_limits import positive_int
from mmpipe.shared.errors import InvalidInputError, LimitExceededError

KWARGS_MAX_BYTES_ENV = "MMPIPE_CHAT_TEMPLATE_KWARGS_MAX_BYTES"
KWARGS_MAX_DEPTH_ENV = "MMPIPE_CHAT_TEMPLATE_KWARGS_MAX_DEPTH"
DOCUMENTS_MAX_COUNT_ENV = "MMPIPE_CHAT_DOCUMENTS_MAX_COUNT"
DOCUMENTS_MAX_BYTES_ENV = "MMPIPE_CHAT_DOCUMENTS_MAX_BYTES"

_FIELD_HINT = "set the request's own field instead"
# name -> why it cannot be a chat_template_kwargs key
RESERVED_KWARGS: dict[str, str] = {
    # transformers' apply_chat_template parameters: they would collide with what the renderer passes, or change how
    # it renders or what it returns (tests/test_chat_template_options.py keeps this list a superset of the signature)
    "conversation": "the messages are the request's messages",
    "tools": f"the request's tools are rendered ({_FIELD_HINT}: tools)",
    "documents": f"{_FIELD_HINT}: documents",
    "chat_template": f"{_FIELD_HINT}: chat_template",
    "add_generation_prompt": f"{_FIELD_HINT}: add_generation_prompt",
    "continue_final_message": f"{_FIELD_HINT}: continue_final_message",
    **{name: "set by the renderer" for name in (
        "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length", "return_tensors",
        "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")},
    # the variables the renderer gives the template, and the globals transformers defines for it
    **{name: "a variable the renderer defines" for name in (
        "messages", "conversations", "raise_exception", "strftime_now", "dict", "namespace")},
}


@dataclass(frozen=True)
class TemplateInputLimits:
    """kwargs_max_bytes: UTF-8 size of chat_template_kwargs as compact JSON; kwargs_max_depth: its nesting (objects
    and arrays, the object itself is level 1); documents_max_count / documents_max_bytes: the documents, and the
    UTF-8 size of all their keys and values together."""

    kwargs_max_bytes: int = 65536
    kwargs_max_depth: int = 32
    documents_max_count: int = 128
    documents_max_bytes: int = 1 << 20

    @classmethod
    def from_env(cls) -> "TemplateInputLimits":
        return cls(kwargs_max_bytes=positive_int(KWARGS_MAX_BYTES_ENV, cls.kwargs_max_bytes),
                   kwargs_max_depth=positive_int(KWARGS_MAX_DEPTH_ENV, cls.kwargs_max_depth),
                   documents_max_count=positive_int(DOCUMENTS_MAX_COUNT_ENV, cls.documents_max_count),
                   documents_max_bytes=positive_int(DOCUMENTS_MAX_BYTES_ENV, cls.documents_max_bytes))


@dataclass(frozen=True)
class ChatTemplateOptions:
    """A request's template inputs, checked (in `__post_init__`, so every instance is valid). `kwargs` is
    chat_template_kwargs; `documents` None means none were given."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    documents: list[dict[str, str]] | None = None

    @classmethod
    def of(cls, *, add_generation_prompt: Any = True, continue_final_message: Any = False,
           chat_template_kwargs: Any = None, documents: Any = None) -> "ChatTemplateOptions":
        """From a request's raw fields (None: not given)."""
        return cls(add_generation_prompt=True if add_generation_prompt is None else add_generation_prompt,
                   continue_final_message=False if continue_final_message is None else continue_final_message,
                   kwargs={} if chat_template_kwargs is None else chat_template_kwargs, documents=documents)

    def __post_init__(self) -> None:
        for name in ("add_generation_prompt", "continue_final_message"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be a boolean", param=name)
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidInputError(
                "continue_final_message and add_generation_prompt cannot both be true (add_generation_prompt "
                "defaults to true: send add_generation_prompt=false to continue the final message)",
                param="continue_final_message")
        limits = TemplateInputLimits.from_env() if self.kwargs or self.documents else TemplateInputLimits()
        _check_kwargs(self.kwargs, limits)
        if self.documents is not None:
            _check_documents(self.documents, limits)

    def check_conversation(self, conversation: list[dict[str, Any]]) -> None:
        """The rules that need the messages (the template conversation shared/chat/messages.py builds)."""
        if not self.continue_final_message:
            return
        last = conversation[-1] if conversation else {}
        if last.get("role") != "assistant":
            raise InvalidInputError(f"continue_final_message continues the final assistant message, but the last "
                                    f"message is the {last.get('role')!r} one", param="continue_final_message")
        content = last.get("content")
        if not isinstance(content, str) and not any(isinstance(p, dict) and p.get("type") == "text"
                                                    for p in content or ()):
            raise InvalidInputError("continue_final_message needs text in the final assistant message to continue",
                                    param="continue_final_message")

    def render_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of transformers' apply_chat_template besides the conversation, template and tools."""
        return {**self.kwargs, "add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message, "documents": self.documents}


def _check_kwargs(kwargs: Any, limits: TemplateInputLimits) -> None:
    param = "chat_template_kwargs"
    if not isinstance(kwargs, dict):
        raise InvalidInputError(f"{param} must be an object", param=param)
    for key in kwargs:
        if not isinstance(key, str) or not key:
            raise InvalidInputError(f"{param} keys must be non-empty strings, got {key!r}", param=param)
        if key in RESERVED_KWARGS:
            raise InvalidInputError(f"{param}.{key} is not allowed: {RESERVED_KWARGS[key]}", param=f"{param}.{key}")
    # iteratively, counting the compact JSON size as it goes: a deep or huge value stops early, never overflows
    size = 0

    def grow(n: int) -> None:
        nonlocal size
        size += n
        if size > limits.kwargs_max_bytes:
            raise LimitExceededError(f"{param} is larger than {limits.kwargs_max_bytes} bytes of JSON "
                                     f"({KWARGS_MAX_BYTES_ENV})", param=param)

    stack: list[tuple[Any, str, int]] = [(kwargs, param, 1)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, (dict, list)) and depth > limits.kwargs_max_depth:
            raise _too_deep(limits)
        if isinstance(value, dict):
            grow(2 + max(2 * len(value) - 1, 0))  # braces, colons, commas
            for k, v in value.items():
                if not isinstance(k, str):
                    raise InvalidInputError(f"{where} keys must be strings, got {k!r}", param=where)
                grow(_json_size(k, where))
                stack.append((v, f"{where}.{k}", depth + 1))
        elif isinstance(value, list):
            grow(2 + max(len(value) - 1, 0))
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
        elif value is None or isinstance(value, (str, bool, int, float)):
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidInputError(f"{where} must be a finite number", param=where)
            grow(_json_size(value, where))
        else:
            raise InvalidInputError(f"{where} must be a JSON value (object, array, string, number, boolean or null), "
                                    f"got {type(value).__name__}", param=where)


def _json_size(value: Any, where: str) -> int:
    try:
        return len(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except ValueError:  # an integer of more than 4300 digits
        raise LimitExceededError(f"{where} is a number too large to render", param=where) from None


def _too_deep(limits: TemplateInputLimits) -> LimitExceededError:
    return LimitExceededError(f"chat_template_kwargs is nested more than {limits.kwargs_max_depth} levels deep "
                              f"(objects and arrays; {KWARGS_MAX_DEPTH_ENV})", param="chat_template_kwargs")


def _check_documents(documents: Any, limits: TemplateInputLimits) -> None:
    if not isinstance(documents, list):
        raise InvalidInputError("documents must be a list of objects of string values", param="documents")
    if len(documents) > limits.documents_max_count:
        raise LimitExceededError(f"{len(documents)} documents; at most {limits.documents_max_count} "
                                 f"({DOCUMENTS_MAX_COUNT_ENV})", param="documents")
    size = 0
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict):
            raise InvalidInputError(f"documents[{i}] must be an object of string values", param=f"documents[{i}]")
        for k, v in doc.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise InvalidInputError(f"documents[{i}].{k} must be a string (documents are objects of string "
                                        f"values)", param=f"documents[{i}].{k}")
            size += len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
            if size > limits.documents_max_bytes:
                raise LimitExceededError(f"the documents' keys and values are more than "
                                         f"{limits.documents_max_bytes} bytes ({DOCUMENTS_MAX_BYTES_ENV})",
                                         param="documents")
