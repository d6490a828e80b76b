"""POST /v1/chat/completions: the pydantic request -> ChatInput -> core -> OpenAI response or SSE chunks.

Stream chunks have the shape of protocol.ChatCompletionStreamResponse (exclude_none) but are written by
http/sse.ChunkEvents, without building a pydantic model per token.

With tools the answer is read by shared/tools/output.py (the gRPC API's reader too): whole into
`message.tool_calls`, or streamed as tool-call deltas (index, id, type and name, then argument fragments);
the finish reason is the plan's ("tool_calls" when calls were made)."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from mmpipe.shared.tools.output import ToolCallStreams, read_answer

from ...core import GatewayCore, GenerationStream
from ...http import sse
from ...types import ChatInput, Completion, RequestContext
from ..protocol import UsageInfo, prompt_logprobs_json
from .protocol import (
    ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessage, ChoiceLogprobs, TokenLogprob,
    ToolCall,
)

ENDPOINT = "/v1/chat/completions"


class OpenAIServingChat:
    def __init__(self, core: GatewayCore):
        self.core = core

    async def create(self, req: ChatCompletionRequest, request_id: str, tenant: str | None = None,
                     session: str | None = None, admitted: bool = False) -> Response:
        inp = ChatInput(messages=req.messages, sampling=req.to_sampling(), model=req.model,
                        chat_template=req.chat_template, template=req.template_options(),
                        add_special_tokens=req.add_special_tokens, tools=req.tool_request(),
                        media_kwargs=req.media_kwargs())
        ctx = RequestContext(request_id=request_id, endpoint=ENDPOINT, tenant=tenant, session=session,
                             admitted=admitted)
        stream = await self.core.chat(inp, ctx)
        if req.stream:
            return sse.EventStreamResponse(self._chunks(req, stream), on_close=stream.close)
        results = await self.core.collect(stream)
        return JSONResponse(self._response(req, stream, results).model_dump(exclude_none=True))

    # ---- non-streaming -------------------------------------------------------------------------------
    def _response(self, req: ChatCompletionRequest, stream: GenerationStream,
                  rs: list[Completion]) -> ChatCompletionResponse:
        request_id, plan = stream.request_id, stream.prepared.tools
        choices = []
        for i, r in enumerate(rs):  # one per sample (n), each parsed for tool calls on its own
            content, calls, finish = read_answer(plan, r.text, r.finish_reason)
            message = ChatMessage(role="assistant", content=content,
                                  tool_calls=[ToolCall.model_validate(c.to_openai()) for c in calls] or None)
            choices.append(ChatCompletionChoice(
                index=i, message=message, finish_reason=finish,
                logprobs=ChoiceLogprobs(content=[TokenLogprob(**e) for e in self._logprob_entries(
                    r.token_ids, r.logprobs, r.top_logprobs, finite=lambda x: x)]) if req.logprobs else None,
                token_ids=r.token_ids if req.return_token_ids else None))
        r = rs[0]  # the prompt is counted once, the completions of every choice (OpenAI's usage with n > 1)
        return ChatCompletionResponse(
            id=f"chatcmpl-{request_id}", created=int(time.time()), model=self.core.model_name, choices=choices,
            usage=UsageInfo.of(r.prompt_tokens, sum(x.completion_tokens for x in rs), r.cached_tokens),
            prompt_token_ids=r.prompt_token_ids if req.return_token_ids else None,
            prompt_logprobs=prompt_logprobs_json(self.core.info.tokenizer, r.prompt_logprobs))

    # ---- streaming -----------------------------------------------------------------------------------
    async def _chunks(self, req: ChatCompletionRequest, stream: GenerationStream) -> AsyncIterator[str]:
        events = sse.ChunkEvents(f"chatcmpl-{stream.request_id}", "chat.completion.chunk", int(time.time()),
                                 self.core.model_name)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        want_lps, want_ids = req.logprobs, req.return_token_ids
        tool_streams = ToolCallStreams(stream.prepared.tools)

        def now_usage() -> dict[str, Any] | None:
            if not continuous:
                return None
            return sse.usage(stream.prompt_tokens, stream.completion_tokens, stream.cached_tokens)

        async with stream:
            for i in range(len(stream.samples)):  # the role first, for every choice (as vLLM sends it)
                yield events.event({"index": i, "delta": {"role": "assistant", "content": ""}}, usage=now_usage(),
                                   prompt_token_ids=stream.prepared.prompt_token_ids if want_ids and i == 0
                                   else None)
            async for d in stream:
                # ChatCompletionStreamChoice's fields in order, None ones left out (exclude_none)
                delta: dict[str, Any] = {"content": d.text}
                finish = d.finish_reason
                if tool_streams.parses:
                    part, finish = tool_streams.feed(d.index, d.text, finish)
                    delta = {"content": part.content} if part.content else {}
                    if part.tool_calls:
                        delta["tool_calls"] = [c.to_openai() for c in part.merged_calls()]
                    if not delta and finish is None and not (want_lps or want_ids):
                        continue  # text held back: it may begin a tool call
                choice: dict[str, Any] = {"index": d.index, "delta": delta}
                if want_lps:
                    choice["logprobs"] = {"content": self._logprob_entries(d.token_ids, d.logprobs,
                                                                           d.top_logprobs)}
                if finish is not None:
                    choice["finish_reason"] = finish
                if want_ids:
                    choice["token_ids"] = d.token_ids
                yield events.event(choice, usage=now_usage())
            if req.include_usage:
                usage = sse.usage(stream.prompt_tokens, stream.completion_tokens, stream.cached_tokens)
                yield events.event(None, usage=usage)

    def _logprob_entries(self, ids: list[int], lps: list[float] | None, tops: list[list[tuple[int, float]]] | None,
                         finite: Any = sse.finite) -> list[dict[str, Any]]:
        """TokenLogprob dicts as JSON: the token's text, its logprob, its UTF-8 bytes and its top alternatives."""
        tok = self.core.info.tokenizer

        def entry(t: int, lp: float) -> dict[str, Any]:
            s = tok.decode([t])
            return {"token": s, "logprob": finite(lp), "bytes": list(s.encode("utf-8"))}

        alts = tops or [[]] * len(ids)
        return [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in alt]}
                for t, lp, alt in zip(ids, lps or [], alts)]
