"""POST /v1/chat/completions: the pydantic request -> ChatInput -> core -> OpenAI response or SSE chunks.

Stream chunks have the shape of protocol.ChatCompletionStreamResponse (exclude_none) but are written by
http/sse.ChunkEvents, without building a pydantic model per token."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from ...core import GatewayCore, GenerationStream
from ...http import sse
from ...types import ChatInput, Completion, RequestContext
from ..protocol import UsageInfo
from .protocol import (
    ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessage, ChoiceLogprobs, TokenLogprob,
)

ENDPOINT = "/v1/chat/completions"


class OpenAIServingChat:
    def __init__(self, core: GatewayCore):
        self.core = core

    async def create(self, req: ChatCompletionRequest, request_id: str, tenant: str | None = None,
                     admitted: bool = False) -> Response:
        inp = ChatInput(messages=req.messages, sampling=req.to_sampling(), model=req.model,
                        chat_template=req.chat_template, add_generation_prompt=req.add_generation_prompt)
        ctx = RequestContext(request_id=request_id, endpoint=ENDPOINT, tenant=tenant, admitted=admitted)
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
            usage=UsageInfo.of(r.prompt_tokens, r.completion_tokens, r.cached_tokens),
            prompt_token_ids=r.prompt_token_ids if req.return_token_ids else None)

    # ---- streaming -----------------------------------------------------------------------------------
    async def _chunks(self, req: ChatCompletionRequest, stream: GenerationStream) -> AsyncIterator[str]:
        events = sse.ChunkEvents(f"chatcmpl-{stream.request_id}", "chat.completion.chunk", int(time.time()),
                                 self.core.model_name)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        want_lps, want_ids = req.logprobs, req.return_token_ids

        def now_usage() -> dict[str, Any] | None:
            if not continuous:
                return None
            return sse.usage(stream.prompt_tokens, len(stream.token_ids), stream.cached_tokens)

        async with stream:
            yield events.event({"index": 0, "delta": {"role": "assistant", "content": ""}}, usage=now_usage(),
                               prompt_token_ids=stream.prepared.prompt_token_ids if want_ids else None)
            async for d in stream:
                # ChatCompletionStreamChoice's fields in order, None ones left out (exclude_none)
                choice: dict[str, Any] = {"index": 0, "delta": {"content": d.text}}
                if want_lps:
                    choice["logprobs"] = {"content": self._logprob_entries(d.token_ids, d.logprobs)}
                if d.finish_reason is not None:
                    choice["finish_reason"] = d.finish_reason
                if want_ids:
                    choice["token_ids"] = d.token_ids
                yield events.event(choice, usage=now_usage())
            if req.include_usage:
                usage = sse.usage(stream.prompt_tokens, len(stream.token_ids), stream.cached_tokens)
                yield events.event(None, usage=usage)

    def _logprob_entries(self, ids: list[int], lps: list[float] | None) -> list[dict[str, Any]]:
        """TokenLogprob dicts as JSON: the token's text, its logprob, its UTF-8 bytes, no alternatives."""
        tok = self.core.info.tokenizer
        out = []
        for t, lp in zip(ids, lps or []):
            s = tok.decode([t])
            out.append({"token": s, "logprob": sse.finite(lp), "bytes": list(s.encode("utf-8")), "top_logprobs": []})
        return out

    def _logprobs(self, ids: list[int], lps: list[float] | None) -> ChoiceLogprobs:
        tok = self.core.info.tokenizer
        content = []
        for t, lp in zip(ids, lps or []):
            s = tok.decode([t])
            content.append(TokenLogprob(token=s, logprob=lp, bytes=list(s.encode("utf-8"))))
        return ChoiceLogprobs(content=content)
