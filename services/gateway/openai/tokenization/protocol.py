"""Wire models of POST /tokenize and POST /detokenize, with vLLM's request and response shapes.

/tokenize takes a prompt (`TokenizeCompletionRequest`) or chat messages (`TokenizeChatRequest`: the chat
template is applied exactly as for /v1/chat/completions, with the request's `tools` rendered by it); which one
is decided by the presence of `messages`. The chat form takes the chat endpoint's own template inputs and checks
them with its rules: `add_generation_prompt`, `continue_final_message`, `chat_template_kwargs` and `documents`
(`ChatTemplateFields`), the tool fields (`ToolFields`) and the media settings (`MediaSettingsFields`; they do not
change these tokens, since a media item stays one placeholder here, but a bad one is the same 400). The prompt
form takes none of them (a 400 naming the field: they only mean something to a chat template). Fields that would
change the tokens and are not implemented on the chat endpoint either are refused by the shared rule
(`refuse_unimplemented`).
"""
from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from mmpipe.shared.errors import InvalidInputError

from ..protocol import ChatTemplateFields, MediaSettingsFields, OpenAIBaseModel, ToolFields, refuse_unimplemented

# the chat form's template inputs, refused on the prompt form (which has no template)
_CHAT_ONLY = ("tools", "chat_template_kwargs", "documents", "continue_final_message")


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # vLLM's default for a prompt: BOS etc. as the tokenizer adds them
    return_token_strs: bool | None = False


class TokenizeChatRequest(MediaSettingsFields, ToolFields, ChatTemplateFields):
    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
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
    extra = dict(req.model_extra or {})
    if isinstance(req, TokenizeCompletionRequest):
        for name in _CHAT_ONLY:
            if extra.get(name) not in (None, False):
                raise InvalidInputError(f"{name} is an input of the chat template: send messages, not prompt",
                                        param=name)
    refuse_unimplemented(extra)  # fields that would change the tokens and that the chat endpoint lacks too
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
