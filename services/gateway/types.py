"""Domain types of the gateway core: what the transports hand in and what the core streams back.

Small dataclasses, no pydantic and no protobuf: the HTTP layer builds them from its pydantic models, the
gRPC servicer from its protobuf messages, and both turn the results back into their own wire types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmpipe.shared.types import SamplingParams


@dataclass(frozen=True)
class RequestContext:
    """Who asks, for which endpoint (metrics label), under which request id (logs of every stage)."""

    request_id: str
    endpoint: str
    tenant: str | None = None
    # The transport already holds this request's --max-concurrent-requests slot (the HTTP guard takes it before
    # reading the body, services/gateway/http/guard.py) and releases it itself: the core takes none.
    admitted: bool = False


@dataclass(frozen=True)
class ChatInput:
    """One chat request. `messages` are OpenAI-shaped dicts (content parts as on vLLM's multimodal page)."""

    messages: list[dict[str, Any]]
    sampling: SamplingParams
    model: str | None = None
    chat_template: str | None = None
    add_generation_prompt: bool = True


@dataclass(frozen=True)
class CompletionInput:
    """One completion request: a text prompt or prompt token ids (exactly one)."""

    sampling: SamplingParams
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    model: str | None = None


@dataclass(frozen=True)
class MediaRef:
    """A media item resolved to a cache key, as the generator needs it. `how`: uuid | hash | miss | embeds."""

    key: str
    modality: str
    num_tokens: int
    how: str
    pb: Any = field(default=None, repr=False, compare=False)  # the stage's EmbeddingRef, passed on unchanged

    @classmethod
    def of(cls, ref: Any, how: str) -> "MediaRef":
        """A stage's EmbeddingRef (services/common/convert.py) and how the gateway got it."""
        return cls(key=ref.key, modality=ref.modality, num_tokens=ref.num_tokens, how=how, pb=ref)


@dataclass
class Delta:
    """What one generation step added: the generator's text delta (it detokenises and applies stop strings),
    the token ids, their logprobs. `finish_reason` is set on the last delta only."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None = None


@dataclass
class Completion:
    """The whole result of one request (non-streaming responses, tests)."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None
    prompt_tokens: int
    prompt_token_ids: list[int]
    cached_tokens: int = 0  # prompt tokens served from the generator's prefix cache (usage.prompt_tokens_details)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
