"""Wire models of POST /v1/chat/completions (OpenAI's shapes, with vLLM's extensions).

Messages stay plain dicts here: their content parts (text, image_url, video_url, input_audio, audio_url,
image_embeds, each with an optional `uuid` and a payload that may be null) are parsed and checked by the
shared chat parser, the same one the offline `LLM.chat` uses, so both accept exactly the same inputs.
`tools` / `tool_choice` / `parallel_tool_calls` are kept as JSON here and validated by shared/tools
(`ToolFields.tool_request()`, shared with /tokenize), the offline API's rules too; so are the template inputs
(`add_generation_prompt`, `continue_final_message`, `chat_template_kwargs`, `documents`: `ChatTemplateFields`,
validated by shared/chat/template_options.py).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from mmpipe.shared.errors import InvalidInputError, UnsupportedError
from mmpipe.shared.types import SamplingParams

from ..protocol import (
    ChatTemplateFields, MediaSettingsFields, OpenAIBaseModel, SamplingFields, ToolFields, UsageInfo, _set,
)


class ChatCompletionRequest(SamplingFields, MediaSettingsFields, ToolFields, ChatTemplateFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template: str | None = None
    add_special_tokens: bool = False  # vLLM's extra: the template already writes the special tokens

    IMPLEMENTED: ClassVar[frozenset[str]] = frozenset({"tools", "tool_choice"})

    def to_sampling(self) -> SamplingParams:
        if _set((self.model_extra or {}).get("echo")):
            # vLLM's chat `echo` puts the last message before the answer; the completions endpoint has it
            raise UnsupportedError("echo is not supported on chat completions (use /v1/completions with echo)",
                                   param="echo")
        # chat: no max_tokens means "what is left of the context" (vLLM), decided by the generator
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.top_logprobs and not self.logprobs:
            raise InvalidInputError("top_logprobs needs logprobs=true", param="top_logprobs")
        return self._sampling(max_tokens=max_tokens, logprobs=(self.top_logprobs or 0) if self.logprobs else None)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text of the arguments object


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    # vLLM extension (return_token_ids)
    token_ids: list[int] | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None  # vLLM's extra


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A call's first piece has index, id, type and name; later pieces index and argument fragments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None
