"""POST /v1/completions: the pydantic request -> CompletionInput -> core -> OpenAI response or SSE chunks.

Stream chunks have the shape of protocol.CompletionResponse (exclude_none) but are written by
http/sse.ChunkEvents, without building a pydantic model per token."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from ...core import GatewayCore, GenerationStream
from ...http import sse
from ...types import CompletionInput, RequestContext
from ..protocol import UsageInfo
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse

ENDPOINT = "/v1/completions"


class OpenAIServingCompletion:
    def __init__(self, core: GatewayCore):
        self.core = core

    async def create(self, req: CompletionRequest, request_id: str, tenant: str | None = None,
                     admitted: bool = False) -> Response:
        text, ids = req.single_prompt()
        inp = CompletionInput(sampling=req.to_sampling(), prompt=text, prompt_token_ids=ids, model=req.model)
        ctx = RequestContext(request_id=request_id, endpoint=ENDPOINT, tenant=tenant, admitted=admitted)
        stream = await self.core.completion(inp, ctx)
        if req.stream:
            return sse.EventStreamResponse(self._chunks(req, stream), on_close=stream.close)
        r = await self.core.collect(stream)
        choice = CompletionChoice(
            text=r.text, finish_reason=r.finish_reason,
            logprobs=self._logprobs(r.token_ids, r.logprobs, 0) if req.logprobs is not None else None,
            token_ids=r.token_ids if req.return_token_ids else None,
            prompt_token_ids=r.prompt_token_ids if req.return_token_ids else None)
        resp = CompletionResponse(id=f"cmpl-{request_id}", created=int(time.time()), model=self.core.model_name,
                                  choices=[choice],
                                  usage=UsageInfo.of(r.prompt_tokens, r.completion_tokens, r.cached_tokens))
        return JSONResponse(resp.model_dump(exclude_none=True))

    async def _chunks(self, req: CompletionRequest, stream: GenerationStream) -> AsyncIterator[str]:
        events = sse.ChunkEvents(f"cmpl-{stream.request_id}", "text_completion", int(time.time()),
                                 self.core.model_name)
        offset = 0
        async with stream:
            first = True
            async for d in stream:
                # CompletionChoice's fields in order, None ones left out (exclude_none)
                choice: dict[str, Any] = {"index": 0, "text": d.text}
                if req.logprobs is not None:
                    lp = self._logprobs(d.token_ids, d.logprobs, offset)
                    choice["logprobs"] = {"tokens": lp.tokens,
                                          "token_logprobs": [sse.finite(x) for x in lp.token_logprobs],
                                          "text_offset": lp.text_offset}
                if d.finish_reason is not None:
                    choice["finish_reason"] = d.finish_reason
                if req.return_token_ids:
                    choice["token_ids"] = d.token_ids
                    if first:
                        choice["prompt_token_ids"] = stream.prepared.prompt_token_ids
                offset += len(d.text)
                first = False
                yield events.event(choice)
            if req.include_usage:
                usage = sse.usage(stream.prompt_tokens, len(stream.token_ids), stream.cached_tokens)
                yield events.event(None, usage=usage)

    def _logprobs(self, ids: list[int], lps: list[float] | None, offset: int) -> CompletionLogprobs:
        tok = self.core.info.tokenizer
        out = CompletionLogprobs()
        for t, lp in zip(ids, lps or []):
            s = tok.decode([t])
            out.tokens.append(s)
            out.token_logprobs.append(lp)
            out.text_offset.append(offset)
            offset += len(s)
        return out
