"""Wire models of POST /v1/chat/completions (OpenAI's shapes, with vLLM's extensions).

Messages stay plain dicts here: their content parts (text, image_url, video_url, input_audio, audio_url,
image_embeds, each with an optional `uuid` and a payload that may be null) are parsed and checked by the
shared chat parser, the same one the offline `LLM.chat` uses, so both accept exactly the same inputs.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from mmpipe.shared.errors import UnsupportedError
from mmpipe.shared.types import SamplingParams

from ..protocol import OpenAIBaseModel, SamplingFields, UsageInfo, _set


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template: str | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # vLLM's extra: the template already writes the special tokens

    def to_sampling(self) -> SamplingParams:
        if _set((self.model_extra or {}).get("echo")):
            # vLLM's chat `echo` puts the last message before the answer; the completions endpoint has it
            raise UnsupportedError("echo is not supported on chat completions (use /v1/completions with echo)",
                                   param="echo")
        # chat: no max_tokens means "what is left of the context" (vLLM), decided by the generator
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.top_logprobs:
            raise UnsupportedError("top_logprobs > 0 is not supported: only the sampled token's logprob is returned "
                                   "(send logprobs=true with top_logprobs 0 or unset)", param="top_logprobs")
        return self._sampling(max_tokens=max_tokens, logprobs=(self.top_logprobs or 0) if self.logprobs else None)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


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


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


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
