"""Domain types of the gateway core: what the transports hand in and what the core streams back.

Small dataclasses, no pydantic and no protobuf: the HTTP layer builds them from its pydantic models, the
gRPC servicer from its protobuf messages, and both turn the results back into their own wire types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmpipe.shared.chat.template_options import ChatTemplateOptions
from mmpipe.shared.tools.request import ToolRequest
from mmpipe.shared.types import SamplingParams


@dataclass(frozen=True)
class RequestContext:
    """Who asks, for which endpoint (metrics label), under which request id (logs of every stage); `session`:
    the --session-key header's value, for --routing-logic session."""

    request_id: str
    endpoint: str
    tenant: str | None = None
    session: str | None = None
    # The transport already holds this request's --max-concurrent-requests slot (the HTTP guard takes it before
    # reading the body, services/gateway/http/guard.py) and releases it itself: the core takes none.
    admitted: bool = False


@dataclass(frozen=True)
class MediaKwargs:
    """A request's own media settings as sent (vLLM's mm_processor_kwargs / media_io_kwargs); None: none."""

    mm_processor_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None


@dataclass(frozen=True)
class ChatInput:
    """One chat request. `messages` are OpenAI-shaped dicts (content parts as on vLLM's multimodal page)."""

    messages: list[dict[str, Any]]
    sampling: SamplingParams
    model: str | None = None
    chat_template: str | None = None
    # add_generation_prompt, continue_final_message, chat_template_kwargs, documents: validated
    template: ChatTemplateOptions = field(default_factory=ChatTemplateOptions)
    add_special_tokens: bool = False  # vLLM's default for chat: the template already has them
    tools: ToolRequest | None = None  # tools, tool_choice, parallel_tool_calls, validated
    media_kwargs: MediaKwargs = field(default_factory=MediaKwargs)


@dataclass(frozen=True)
class CompletionInput:
    """One completion request: a text prompt or prompt token ids (exactly one)."""

    sampling: SamplingParams
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    model: str | None = None
    add_special_tokens: bool = True  # for a text prompt (vLLM's and the tokenizer's default)
    media_kwargs: MediaKwargs = field(default_factory=MediaKwargs)


@dataclass(frozen=True)
class TokenizeInput:
    """One tokenize request (POST /tokenize, Gateway.Tokenize): a text prompt or chat messages (exactly one); the
    chat-only fields (chat template and its inputs, tools, media settings) are those of ChatInput."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    model: str | None = None
    add_special_tokens: bool | None = None  # None: the default of the kind (prompt: True, messages: False)
    template: ChatTemplateOptions = field(default_factory=ChatTemplateOptions)  # as for a chat request
    chat_template: str | None = None
    return_token_strs: bool = False
    tools: ToolRequest | None = None  # rendered by the template as for a chat request (the choice changes nothing)
    media_kwargs: MediaKwargs = field(default_factory=MediaKwargs)  # checked as for a chat request


@dataclass(frozen=True)
class Tokenized:
    """The ids a prompt or chat becomes, as the generation endpoints send them (one placeholder per item)."""

    tokens: list[int]
    max_model_len: int | None
    token_strs: list[str] | None = None

    @property
    def count(self) -> int:
        return len(self.tokens)


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
    """What one generation step added to one sample: the generator's text delta (it detokenises and applies stop
    strings), the token ids, their logprobs. `finish_reason` is set on the sample's last delta only."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None = None
    index: int = 0  # the sample (n > 1); its finish_reason is set on its own last delta
    # per token: its top (token id, logprob) alternatives, when the request asked for them
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class Completion:
    """The whole result of one sample of a request (non-streaming responses, tests)."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None
    prompt_tokens: int
    prompt_token_ids: list[int]
    cached_tokens: int = 0  # prompt tokens served from the generator's prefix cache (usage.prompt_tokens_details)
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # with prompt_logprobs: per prompt token (id, logprob, rank, alternatives), None for the first
    prompt_logprobs: list | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
