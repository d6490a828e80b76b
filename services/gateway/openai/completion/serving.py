"""POST /v1/completions: the pydantic request -> one CompletionInput per prompt -> core -> OpenAI response or SSE.

A list of prompts is one request per prompt through the core, all started before the response begins (so a
bad prompt is still a plain 400 and none of them runs on), generated concurrently, answered as one choice per
prompt (with n samples each, choice `index` = prompt index * n + sample index, as vLLM numbers them); usage
adds them up (each prompt counted once). Sub-requests are named `<request id>-<index>`
in the stages' logs, as vLLM names them. With `echo`, each choice's text starts with its prompt's text (the
prompt as sent, or the decoded token ids), in the first stream chunk of that choice; with `echo` and `logprobs`
its logprobs start with the prompt tokens' (vLLM's shape: the first token's logprob and alternatives null,
text_offset counting on over prompt and completion), streamed in that first chunk too (logprobs.py writes both,
so the chunks of a choice, concatenated, are its whole answer).

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
from ...types import CompletionInput, Delta, RequestContext
from ..protocol import UsageInfo, prompt_logprobs_json
from .logprobs import LogprobsWriter, choice_entries, chunk_json
from .protocol import CompletionChoice, CompletionRequest, CompletionResponse

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
            logprobs=self._writer(req).write(choice_entries(
                r.token_ids, r.logprobs, r.top_logprobs,
                prompt=(r.prompt_token_ids, r.prompt_logprobs) if req.echo_logprobs else None))
            if req.logprobs is not None else None,
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
        echo (and with logprobs the prompt tokens' logprobs) goes with the first chunk of each of its samples."""
        n = len(stream.samples)
        writers = [self._writer(req) for _ in range(n)] if req.logprobs is not None else None
        firsts = [True] * n
        # Sample 0's first message brings the prompt logprobs; a sample's delta that comes before it waits for it.
        ready = not req.echo_logprobs
        held: list[Delta] = []

        def choice(d: Delta) -> dict[str, Any]:
            first, firsts[d.index] = firsts[d.index], False
            return self._choice(req, prompt_index * n + d.index, d, stream, echo if first else None,
                                writers[d.index] if writers is not None else None)

        async with stream:
            async for d in stream:
                if not ready:
                    ready = d.index == 0 or stream.prompt_logprobs is not None
                    if not ready:
                        held.append(d)
                        continue
                    for h in held:
                        yield choice(h)
                    held.clear()
                yield choice(d)
        for h in held:  # the stream ended before sample 0 spoke (it cannot, but never drop output)
            yield choice(h)

    def _choice(self, req: CompletionRequest, index: int, d: Delta, stream: GenerationStream, echo: str | None,
                writer: LogprobsWriter | None) -> dict[str, Any]:
        """One chunk's choice; `echo` is set on a sample's first chunk (its text, and the prompt's logprobs)."""
        first = echo is not None
        choice: dict[str, Any] = {"index": index, "text": echo + d.text if first else d.text}
        if writer is not None:
            prompt = (stream.prepared.prompt_token_ids, stream.prompt_logprobs) if first and req.echo_logprobs else None
            lp = writer.write(choice_entries(d.token_ids, d.logprobs, d.top_logprobs, prompt=prompt))
            choice["logprobs"] = chunk_json(lp, sse.finite)
        if d.finish_reason is not None:
            choice["finish_reason"] = d.finish_reason
        if req.return_token_ids:
            choice["token_ids"] = d.token_ids
            if first:
                choice["prompt_token_ids"] = stream.prepared.prompt_token_ids
        return choice

    def _writer(self, req: CompletionRequest) -> LogprobsWriter:
        return LogprobsWriter(self.core.info.tokenizer, with_tops=bool(req.logprobs))


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
