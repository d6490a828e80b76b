"""POST /v1/completions: the pydantic request -> one CompletionInput per prompt -> core -> OpenAI response or SSE.

A list of prompts is one request per prompt through the core, all started before the response begins (so a
bad prompt is still a plain 400 and none of them runs on), generated concurrently, answered as one choice per
prompt (with n samples each, choice `index` = prompt index * n + sample index, as vLLM numbers them); usage
adds them up (each prompt counted once). Sub-requests are named `<request id>-<index>`
in the stages' logs, as vLLM names them. With `echo`, each choice's text starts with its prompt's text (the
prompt as sent, or the decoded token ids), in the first stream chunk of that choice; with `echo` and `logprobs`
(not streamed) its logprobs start with the prompt tokens' (vLLM's shape: the first token's logprob and
alternatives null, text_offset counting on over prompt and completion).

Stream chunks have the shape of protocol.CompletionResponse (exclude_none) but are written by
http/sse.ChunkEvents, without building a pydantic model per token."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi.responses import JSONResponse, Response

from ...core import GatewayCore, GenerationStream
from ...http import sse
from ...types import CompletionInput, RequestContext
from ..protocol import UsageInfo, prompt_logprobs_json
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse

ENDPOINT = "/v1/completions"
T = TypeVar("T")


class OpenAIServingCompletion:
    def __init__(self, core: GatewayCore):
        self.core = core

    async def create(self, req: CompletionRequest, request_id: str, tenant: str | None = None,
                     session: str | None = None, admitted: bool = False) -> Response:
        prompts = req.prompts()
        sampling = req.to_sampling()
        media_kwargs = req.media_kwargs()
        inputs = [CompletionInput(sampling=sampling, prompt=text, prompt_token_ids=ids, model=req.model,
                                  add_special_tokens=req.add_special_tokens, media_kwargs=media_kwargs)
                  for text, ids in prompts]
        ids_of = [request_id] if len(inputs) == 1 else [f"{request_id}-{i}" for i in range(len(inputs))]
        streams = await self._start_all(
            inputs, [RequestContext(request_id=r, endpoint=ENDPOINT, tenant=tenant, session=session,
                                   admitted=admitted)
                    for r in ids_of])
        echoes = [self.core.echo_text(inp, s) if req.echo else "" for inp, s in zip(inputs, streams)]
        if req.stream:
            async def close_all() -> None:
                for s in streams:
                    await s.close()

            return sse.EventStreamResponse(self._chunks(req, request_id, streams, echoes), on_close=close_all)
        per_prompt = await _gather_all([self.core.collect(s) for s in streams])  # one Completion per sample
        n = sampling.n
        choices = [CompletionChoice(
            index=p * n + i, text=echo + r.text, finish_reason=r.finish_reason,
            logprobs=self._logprobs(r.token_ids, r.logprobs, r.top_logprobs, 0,
                                    prompt=(r.prompt_token_ids, r.prompt_logprobs, req.logprobs) if req.echo_logprobs
                                    else None) if req.logprobs is not None else None,
            token_ids=r.token_ids if req.return_token_ids else None,
            prompt_token_ids=r.prompt_token_ids if req.return_token_ids else None,
            prompt_logprobs=prompt_logprobs_json(self.core.info.tokenizer, r.prompt_logprobs)
            if req.prompt_logprobs is not None else None)  # asked for (not only implied by echo), as vLLM
            for p, (rs, echo) in enumerate(zip(per_prompt, echoes)) for i, r in enumerate(rs)]
        # each prompt is counted once, the completions of every choice
        usage = UsageInfo.of(sum(rs[0].prompt_tokens for rs in per_prompt),
                             sum(x.completion_tokens for rs in per_prompt for x in rs),
                             sum(rs[0].cached_tokens for rs in per_prompt))
        resp = CompletionResponse(id=f"cmpl-{request_id}", created=int(time.time()), model=self.core.model_name,
                                  choices=choices, usage=usage)
        return JSONResponse(resp.model_dump(exclude_none=True))

    async def _start_all(self, inputs: list[CompletionInput], ctxs: list[RequestContext]) -> list[GenerationStream]:
        """Start every prompt's request; if one fails, close the others and raise its error."""
        if len(inputs) == 1:
            return [await self.core.completion(inputs[0], ctxs[0])]
        tasks = [asyncio.ensure_future(self.core.completion(i, c)) for i, c in zip(inputs, ctxs)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            for t in tasks:
                try:
                    s = await t
                except BaseException:  # noqa: S112 - that request failed or was cancelled: nothing to close
                    continue
                await s.close()
            raise

    async def _chunks(self, req: CompletionRequest, request_id: str, streams: list[GenerationStream],
                      echoes: list[str]) -> AsyncIterator[str]:
        events = sse.ChunkEvents(f"cmpl-{request_id}", "text_completion", int(time.time()), self.core.model_name)
        async for choice in merge([self._choices(req, p, s, echoes[p]) for p, s in enumerate(streams)]):
            yield events.event(choice)
        if req.include_usage:
            usage = sse.usage(sum(s.prompt_tokens for s in streams), sum(s.completion_tokens for s in streams),
                              sum(s.cached_tokens for s in streams))
            yield events.event(None, usage=usage)

    async def _choices(self, req: CompletionRequest, prompt_index: int, stream: GenerationStream,
                       echo: str) -> AsyncIterator[dict[str, Any]]:
        """One prompt's stream as CompletionChoice dicts (fields in order, None ones left out: exclude_none); the
        echo goes with the first chunk of each of its samples."""
        n = len(stream.samples)
        offsets = [0] * n  # per sample
        firsts = [True] * n
        async with stream:
            async for d in stream:
                first = firsts[d.index]
                choice: dict[str, Any] = {"index": prompt_index * n + d.index,
                                          "text": echo + d.text if first else d.text}
                if req.logprobs is not None:
                    lp = self._logprobs(d.token_ids, d.logprobs, d.top_logprobs, offsets[d.index])
                    choice["logprobs"] = {"tokens": lp.tokens,
                                          "token_logprobs": [sse.finite(x) for x in lp.token_logprobs],
                                          **({"top_logprobs": lp.top_logprobs} if lp.top_logprobs else {}),
                                          "text_offset": lp.text_offset}
                if d.finish_reason is not None:
                    choice["finish_reason"] = d.finish_reason
                if req.return_token_ids:
                    choice["token_ids"] = d.token_ids
                    if first:
                        choice["prompt_token_ids"] = stream.prepared.prompt_token_ids
                offsets[d.index] += len(d.text)
                firsts[d.index] = False
                yield choice

    def _logprobs(self, ids: list[int], lps: list[float] | None, tops: list[list[tuple[int, float]]] | None,
                  offset: int, prompt: tuple[list[int], list | None, int] | None = None) -> CompletionLogprobs:
        """OpenAI's legacy logprobs; `top_logprobs` maps each alternative's text to its logprob (vLLM's shape).
        `prompt` (echo): the prompt's token ids, their prompt logprobs (None first) and the alternatives asked
        for; they come first."""
        tok = self.core.info.tokenizer
        out = CompletionLogprobs(top_logprobs=[] if tops or (prompt and prompt[2]) else None)

        def add(t: int, lp: float | None, alts: list[tuple[int, float]] | None) -> None:
            nonlocal offset
            s = tok.decode([t])
            out.tokens.append(s)
            out.token_logprobs.append(lp)
            out.text_offset.append(offset)
            if out.top_logprobs is not None:
                out.top_logprobs.append(None if alts is None else {tok.decode([a]): v for a, v in alts})
            offset += len(s)

        if prompt is not None:
            prompt_ids, entries, _ = prompt
            for t, e in zip(prompt_ids, entries or [None] * len(prompt_ids)):
                if e is None:  # the first prompt token: nothing before it
                    add(t, None, None)
                else:
                    add(t, e[1], e[3])
        for i, (t, lp) in enumerate(zip(ids, lps or [])):
            add(t, lp, tops[i] if tops else None)
        return out


async def _gather_all(aws: list[Any]) -> list[Any]:
    """Await all; on the first failure cancel the rest and raise that failure (not an ExceptionGroup)."""
    if len(aws) == 1:
        return [await aws[0]]
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merge(gens: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of several async iterators as they come; the first failure ends it (and the others)."""
    if len(gens) == 1:  # the common case: no task, no queue
        async for x in gens[0]:
            yield x
        return
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()

    async def pump(g: AsyncIterator[T]) -> None:
        try:
            async for x in g:
                await queue.put((False, x))
            await queue.put((True, None))
        except BaseException as e:  # handed to the consumer, which raises it
            await queue.put((True, e))

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    try:
        left = len(gens)
        while left:
            done, x = await queue.get()
            if not done:
                yield x
                continue
            if x is not None:
                raise x
            left -= 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
