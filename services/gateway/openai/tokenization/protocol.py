"""Wire models of POST /tokenize and POST /detokenize, with vLLM's request and response shapes.

/tokenize takes a prompt (`TokenizeCompletionRequest`) or chat messages (`TokenizeChatRequest`: the chat
template is applied exactly as for /v1/chat/completions); which one is decided by the presence of `messages`.
Fields that would change the tokens and are not implemented are refused by the shared rule
(`refuse_unimplemented`), as on the generation endpoints.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from mmpipe.shared.errors import InvalidInputError

from ..protocol import OpenAIBaseModel, refuse_unimplemented


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # vLLM's default for a prompt: BOS etc. as the tokenizer adds them
    return_token_strs: bool | None = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    add_generation_prompt: bool = True
    return_token_strs: bool | None = False
    add_special_tokens: bool = False  # vLLM's default for chat: the template already has them
    chat_template: str | None = None


def tokenize_request(body: Any) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The body as one of the two shapes (chat when it has `messages`), or a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidInputError("the request body must be a JSON object", param=None)
    cls = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ())) or None
        raise InvalidInputError(f"invalid request: {loc}: {err.get('msg')}" if loc else str(err.get("msg")),
                                param=loc) from None
    # continue_final_message, chat_template_kwargs, tools, mm_processor_kwargs ... would change the tokens
    refuse_unimplemented(dict(req.model_extra or {}))
    return req


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
