"""POST /v1/chat/completions: the pydantic request -> ChatInput -> core -> OpenAI response or SSE chunks."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from ...core import GatewayCore, GenerationStream
from ...http import sse
from ...types import ChatInput, Completion, Delta, RequestContext
from ..protocol import UsageInfo
from .protocol import (
    ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamChoice,
    ChatCompletionStreamResponse, ChatMessage, ChoiceLogprobs, DeltaMessage, TokenLogprob,
)

ENDPOINT = "/v1/chat/completions"


class OpenAIServingChat:
    def __init__(self, core: GatewayCore):
        self.core = core

    async def create(self, req: ChatCompletionRequest, request_id: str, tenant: str | None = None) -> Response:
        inp = ChatInput(messages=req.messages, sampling=req.to_sampling(), model=req.model,
                        chat_template=req.chat_template, add_generation_prompt=req.add_generation_prompt)
        ctx = RequestContext(request_id=request_id, endpoint=ENDPOINT, tenant=tenant)
        stream = await self.core.chat(inp, ctx)
        if req.stream:
            return sse.EventStreamResponse(self._chunks(req, stream), on_close=stream.close)
        result = await self.core.collect(stream)
        return JSONResponse(self._response(req, stream.request_id, result).model_dump(exclude_none=True))

    # ---- non-streaming -------------------------------------------------------------------------------
    def _response(self, req: ChatCompletionRequest, request_id: str, r: Completion) -> ChatCompletionResponse:
        choice = ChatCompletionChoice(
            message=ChatMessage(role="assistant", content=r.text), finish_reason=r.finish_reason,
            logprobs=self._logprobs(r.token_ids, r.logprobs) if req.logprobs else None,
            token_ids=r.token_ids if req.return_token_ids else None)
        return ChatCompletionResponse(
            id=f"chatcmpl-{request_id}", created=int(time.time()), model=self.core.model_name, choices=[choice],
            usage=UsageInfo.of(r.prompt_tokens, r.completion_tokens),
            prompt_token_ids=r.prompt_token_ids if req.return_token_ids else None)

    # ---- streaming -----------------------------------------------------------------------------------
    async def _chunks(self, req: ChatCompletionRequest, stream: GenerationStream) -> AsyncIterator[str]:
        created, rid = int(time.time()), f"chatcmpl-{stream.request_id}"
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

        def chunk(choices: list[ChatCompletionStreamChoice], **kw: Any) -> str:
            if continuous and "usage" not in kw:
                kw["usage"] = UsageInfo.of(stream.prompt_tokens, len(stream.token_ids))
            return sse.event(ChatCompletionStreamResponse(id=rid, created=created, model=self.core.model_name,
                                                          choices=choices, **kw))

        async with stream:
            first = ChatCompletionStreamChoice(delta=DeltaMessage(role="assistant", content=""))
            yield chunk([first], prompt_token_ids=stream.prepared.prompt_token_ids if req.return_token_ids else None)
            async for d in stream:
                yield chunk([self._stream_choice(req, d)])
            if req.include_usage:
                yield chunk([], usage=UsageInfo.of(stream.prompt_tokens, len(stream.token_ids)))

    def _stream_choice(self, req: ChatCompletionRequest, d: Delta) -> ChatCompletionStreamChoice:
        return ChatCompletionStreamChoice(
            delta=DeltaMessage(content=d.text), finish_reason=d.finish_reason,
            logprobs=self._logprobs(d.token_ids, d.logprobs) if req.logprobs else None,
            token_ids=d.token_ids if req.return_token_ids else None)

    def _logprobs(self, ids: list[int], lps: list[float] | None) -> ChoiceLogprobs:
        tok = self.core.info.tokenizer
        content = []
        for t, lp in zip(ids, lps or []):
            s = tok.decode([t])
            content.append(TokenLogprob(token=s, logprob=lp, bytes=list(s.encode("utf-8"))))
        return ChoiceLogprobs(content=content)
