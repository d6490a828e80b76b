"""Wire models of POST /v1/completions (OpenAI's legacy completions, one prompt per request)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from mmpipe.shared.errors import InvalidInputError, UnsupportedError
from mmpipe.shared.types import SamplingParams

from ..protocol import MediaSettingsFields, OpenAIBaseModel, SamplingFields, UsageInfo


class CompletionRequest(SamplingFields, MediaSettingsFields):
    # a string, token ids, or a one-element list of either (the openai client sends lists too)
    prompt: str | list[int] | list[str] | list[list[int]]
    # OpenAI's default for completions (vLLM keeps it)
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def to_sampling(self) -> SamplingParams:
        if self.echo:
            raise UnsupportedError("echo is not supported", param="echo")
        if self.suffix:
            raise UnsupportedError("suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise UnsupportedError("best_of is not supported", param="best_of")
        return self._sampling(max_tokens=self.max_tokens, logprobs=self.logprobs)

    def single_prompt(self) -> tuple[str | None, list[int] | None]:
        """(text, None) or (None, token ids); batches of prompts are refused with a clear 400."""
        p = self.prompt
        if isinstance(p, str):
            return p, None
        if p and all(isinstance(x, int) for x in p):
            return None, list(p)  # type: ignore[arg-type]
        if isinstance(p, list) and len(p) == 1:
            one = p[0]
            return (one, None) if isinstance(one, str) else (None, list(one))  # type: ignore[arg-type]
        raise InvalidInputError("send one prompt per request (a string or a list of token ids)", param="prompt")


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None  # vLLM's extra


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
