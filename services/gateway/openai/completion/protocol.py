"""Wire models of POST /v1/completions (OpenAI's legacy completions): one prompt or a list of them (one choice
per prompt, `index` its place in the list), `echo` (the prompt's text before the completion), as vLLM does.
`echo` with `logprobs` asks for the prompt tokens' logprobs too (vLLM's rule: prompt_logprobs = logprobs unless
the request sets prompt_logprobs), which the logprobs then start with, streamed or not (a stream sends them in the
first chunk of each choice, as vLLM)."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, Field

from mmpipe.shared.errors import InvalidInputError, UnsupportedError
from mmpipe.shared.types import SamplingParams

from ..protocol import MediaSettingsFields, OpenAIBaseModel, SamplingFields, UsageInfo


class CompletionRequest(SamplingFields, MediaSettingsFields):
    # a string, token ids, or a list of either: one choice per prompt
    prompt: str | list[int] | list[str] | list[list[int]]
    add_special_tokens: bool = True  # vLLM's extra: BOS etc. on a text prompt, as the tokenizer adds them
    # OpenAI's default for completions (vLLM keeps it)
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @property
    def echo_logprobs(self) -> bool:
        """The logprobs start with the prompt tokens' (the first one null), as vLLM's with echo."""
        return self.echo and self.logprobs is not None

    def to_sampling(self) -> SamplingParams:
        if self.suffix:
            raise UnsupportedError("suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise UnsupportedError("best_of is not supported", param="best_of")
        sp = self._sampling(max_tokens=self.max_tokens, logprobs=self.logprobs)
        if self.echo_logprobs and self.prompt_logprobs is None:
            sp = dataclasses.replace(sp, prompt_logprobs=self.logprobs)
        return sp

    def prompts(self) -> list[tuple[str | None, list[int] | None]]:
        """Each prompt as (text, None) or (None, token ids), in order: one choice each."""
        p = self.prompt
        if isinstance(p, str):
            return [(p, None)]
        if not p:
            raise InvalidInputError("the prompt list is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [(None, list(p))]  # type: ignore[arg-type]
        return [(x, None) if isinstance(x, str) else (None, list(x)) for x in p]  # type: ignore[misc]


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs; with echo the prompt's tokens come first, the first one's entries null."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None
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
