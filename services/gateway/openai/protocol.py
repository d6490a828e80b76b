"""Pydantic models shared by the OpenAI endpoints: sampling fields, usage, errors, stream options.

Field names and defaults follow the OpenAI API and vLLM's extensions (top_k, min_tokens, ignore_eos,
stop_token_ids, skip_special_tokens, include_stop_str_in_output, return_token_ids). Unknown fields are
accepted and ignored, as vLLM does, so newer clients keep working.
"""
from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmpipe.shared.errors import UnsupportedError
from mmpipe.shared.types import SamplingParams

logger = logging.getLogger(__name__)


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_extra(self) -> "OpenAIBaseModel":
        if self.model_extra:
            logger.debug("ignoring unknown request fields: %s", sorted(self.model_extra))
        return self


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(OpenAIBaseModel):
    """The sampling fields both endpoints accept."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None
    min_tokens: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1)
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extension: return prompt and completion token ids in the response
    return_token_ids: bool = False
    user: str | None = None

    def _sampling(self, *, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if self.n != 1:
            raise UnsupportedError("only n=1 is supported", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise UnsupportedError(f"{name} is not supported (leave it 0)", param=name)
        if self.repetition_penalty not in (None, 1.0):
            raise UnsupportedError("repetition_penalty is not supported (leave it 1)", param="repetition_penalty")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None or self.top_k < 0 else self.top_k,
            min_tokens=self.min_tokens, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "mmpipe"
    root: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text of each token, as OpenAI logprobs show it."""
    return [tokenizer.decode([t]) for t in ids]


def extra_fields(model: BaseModel) -> dict[str, Any]:
    return dict(model.model_extra or {})
