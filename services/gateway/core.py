"""The gateway core: one request from domain input to a stream of generated text, for every transport.

    check model -> prepare (template, tokens, limits, placeholders, policy) -> resolve media to cache keys
    -> generator.Generate (streamed token ids + text deltas) -> Deltas

The generator owns detokenisation and stop strings (shared/detokenizer.py, as the offline loop): it streams
text deltas, cuts the tokens after a stop string and ends the stream itself, so the gateway only forwards.

The OpenAI HTTP routes and the public gRPC servicer both call `GatewayCore.chat` / `.completion` and only
convert wire types; nothing here knows HTTP or gRPC. A started `GenerationStream` has already received
its first token, so every failure before that (bad input, stage down, cache miss) is raised from
`chat()` / `completion()` and can still become a proper status code; later failures end the stream.

Steps (mmpipe_gateway_step_duration_seconds, services/common/steps.py): parse, template and tokenize in
`prepare.py`, resolve (media to cache keys) and first_token (the Generate call until its first message) here.
With tracing on, each request is one span from arrival to its last byte, with a child span per step; the stage
calls made inside it carry its `traceparent`, so the stages' spans join the same trace.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mmpipe.services.common import tracing
from mmpipe.shared.errors import (
    CancelledError, InvalidInputError, MediaTimeoutError, MMPipeError, NotCachedError, NotFoundError, OverloadedError,
    ServiceUnavailableError,
)

from .config import GatewayConfig
from .media import resolve_media
from .metrics import RequestMetrics
from .model_info import ModelInfo
from .prepare import PreparedPrompt, Preparer
from .stages import StageClients
from .types import ChatInput, Completion, CompletionInput, Delta, RequestContext, TokenizeInput, Tokenized

logger = logging.getLogger(__name__)


# Pause before the one transparent retry of a stage that answered UNAVAILABLE (gRPC reconnects in 0.2-2 s).
STAGE_RETRY_PAUSE_S = 0.5
# The Generate call carries the request's deadline; when gRPC ends it this close to that deadline (clocks and
# scheduling differ by a little), it is the request timeout (504), not a stage failure (503).
DEADLINE_SLACK_S = 0.05


class RequestTimeoutError(MediaTimeoutError):
    """The whole request took longer than --request-timeout (504 / DEADLINE_EXCEEDED)."""


class GatewayCore:
    def __init__(self, cfg: GatewayConfig, info: ModelInfo, stages: StageClients):
        self.cfg = cfg
        self.info = info
        self.stages = stages
        self.preparer = Preparer(cfg, info)
        self.steps = self.preparer.steps
        self.in_flight = 0

    @property
    def model_name(self) -> str:
        return self.cfg.served_model_name

    def check_model(self, model: str | None) -> None:
        """The request's `model` is one of the served names (or unset), else a 404 naming it."""
        if not self.cfg.accepts_model(model):
            raise NotFoundError(f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                                param="model")

    # ---- entry points --------------------------------------------------------------------------------
    async def chat(self, inp: ChatInput, ctx: RequestContext) -> "GenerationStream":
        self._check_n(inp.sampling.n)
        return await self._start(ctx, inp.model, lambda: self.preparer.chat(inp))

    async def completion(self, inp: CompletionInput, ctx: RequestContext) -> "GenerationStream":
        self._check_n(inp.sampling.n)
        return await self._start(ctx, inp.model, lambda: self.preparer.completion(inp))

    def _check_n(self, n: int) -> None:
        if n > self.cfg.max_n:
            raise InvalidInputError(f"n={n} is more samples than this server gives one request (--max-n "
                                    f"{self.cfg.max_n})", param="n")

    async def _start(self, ctx: RequestContext, model: str | None, prepare) -> "GenerationStream":
        metrics = RequestMetrics(self.model_name, ctx.endpoint)
        # current while this task starts the request (steps, stage calls); ended by metrics.finish
        metrics.span = tracing.start_request(ctx.endpoint, request_id=ctx.request_id, **{
            "gen_ai.request.model": self.model_name}) if tracing.enabled() else None
        deadline = time.monotonic() + self.cfg.request_timeout_s
        admitted = False
        stream: GenerationStream | None = None
        try:
            self.check_model(model)
            if not ctx.admitted:
                self.admit()
                admitted = True
            # Templates and tokenisation are CPU work: off the event loop, so other requests keep streaming.
            prepared: PreparedPrompt = await asyncio.to_thread(prepare)
            stream = GenerationStream(self, prepared, ctx, metrics, deadline)
            await _within(deadline, stream.start())
            return stream
        except BaseException as e:
            if stream is not None:
                await stream._aclose_chunks()
            if admitted:
                self.release()
            metrics.finish(_status_of(e))
            raise
        finally:
            if metrics.span is not None:
                metrics.span.detach()  # the stream goes on in the caller's task; the span with it

    # ---- tokenizer only ---------------------------------------------------------------------------------
    async def tokenize(self, inp: TokenizeInput) -> Tokenized:
        """A prompt's or chat's token ids through the same Preparer steps as a generation request; no stage is
        called and no media is fetched, so each media item stays one placeholder token."""
        self.check_model(inp.model)
        if (inp.prompt is None) == (inp.messages is None):
            raise InvalidInputError("give exactly one of prompt or messages", param="prompt")
        if inp.messages is not None:
            # templates are CPU work: off the event loop, as for generation requests
            ids = await asyncio.to_thread(self.preparer.tokenize_chat, inp)
        else:
            special = True if inp.add_special_tokens is None else inp.add_special_tokens
            ids = await asyncio.to_thread(self.preparer.tokenize_prompt, inp.prompt, add_special_tokens=special)
        strs = list(self.info.tokenizer.convert_ids_to_tokens(ids)) if inp.return_token_strs else None
        return Tokenized(tokens=list(ids), max_model_len=self.info.max_model_len, token_strs=strs)

    def detokenize(self, model: str | None, ids: list[int]) -> str:
        """The text of token ids (special tokens included, as vLLM's /detokenize)."""
        self.check_model(model)
        return self.info.tokenizer.decode(self.preparer.check_token_ids(list(ids), param="tokens"))

    def echo_text(self, inp: CompletionInput, stream: "GenerationStream") -> str:
        """What `echo` puts before a completion: the prompt as sent, or its token ids decoded (vLLM's rule)."""
        if inp.prompt is not None:
            return inp.prompt
        return self.info.tokenizer.decode(stream.prepared.prompt_token_ids)

    async def collect(self, stream: "GenerationStream") -> list[Completion]:
        """Drain a stream into one Completion per sample (non-streaming responses)."""
        async with stream:
            async for _ in stream:
                pass
        return stream.results()

    def admit(self) -> None:
        """Take one of the --max-concurrent-requests slots, or fail with 429 at once (never queue)."""
        if self.in_flight >= self.cfg.max_concurrent_requests:
            raise OverloadedError(f"the gateway is serving {self.in_flight} requests, its limit "
                                  f"(--max-concurrent-requests); retry shortly")
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


class GenerationStream:
    """The generated output of one request, as Deltas. Use `async with` so that leaving early (client gone,
    error) cancels the generator call at once, freeing its slot in the generator's batch."""

    def __init__(self, core: GatewayCore, prepared: PreparedPrompt, ctx: RequestContext,
                 metrics: RequestMetrics, deadline: float):
        self.core = core
        self.prepared = prepared
        self.ctx = ctx
        self.metrics = metrics
        self.deadline = deadline
        sp = prepared.sampling
        self.want_logprobs = sp.logprobs is not None
        self.samples = [_Sample(logprobs=[] if self.want_logprobs else None,
                                top_logprobs=[] if sp.logprobs else None) for _ in range(sp.n)]
        self._unfinished = sp.n
        # with prompt_logprobs: per prompt token (id, logprob, rank, alternatives), None first (from sample 0)
        self.prompt_logprobs: list | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self._chunks: AsyncIterator[Any] | None = None
        self._first: Any | None = None
        self._closed = False
        self._status = 200

    @property
    def request_id(self) -> str:
        return self.ctx.request_id

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resolve media, start generating, and wait for the first token (so early errors still raise here).

        Two transparent retries, each at most once, both before any output exists: an embedding evicted
        between resolving and generating is resolved again (ingest re-encodes it), and a stage that answers
        UNAVAILABLE (restarting, Redis reconnecting) is asked again after a short pause; every call retried is
        idempotent (Lookup, Ingest, Encode, PutEmbeddings, and Generate before its first token). A second
        failure is a 503 with Retry-After."""
        core, p = self.core, self.prepared
        evicted = unavailable = 0
        while True:
            try:
                resolving = resolve_media(core.stages, p.media, self.ctx, timeout=self._left(),
                                          model=core.model_name, kw=p.media_kwargs,
                                          max_embed_rows=self._embed_rows())
                refs = await (core.steps.timed("resolve", resolving) if p.media else resolving)
                self._chunks = core.stages.generate(p.prompt_token_ids, refs, p.sampling, self.ctx, self._left())
                self._first = await core.steps.timed("first_token", self._chunks.__anext__())
                return
            except ServiceUnavailableError:
                await self._aclose_chunks()
                if unavailable:
                    raise
                unavailable += 1
                logger.info("request %s: a stage was unavailable; retrying once", self.request_id)
                await asyncio.sleep(min(STAGE_RETRY_PAUSE_S, self._left() / 2))
            except (NotCachedError, NotFoundError) as e:
                if self._chunks is None:
                    raise  # from resolving (a UUID-only item that is not cached): the client's 400
                # An embedding was evicted between resolving and generating: resolve once more (ingest
                # re-encodes what it has the payload of; a UUID-only item then fails with a clear 400).
                await self._aclose_chunks()
                if not p.media:
                    raise
                if evicted:
                    raise ServiceUnavailableError(f"embeddings were evicted from the cache before generation "
                                                  f"twice ({e.message}); the cache is too small for the load, "
                                                  f"retry shortly") from None
                evicted += 1
                logger.info("request %s: an embedding was evicted before generation; resolving again",
                            self.request_id)
            except StopAsyncIteration:
                raise MMPipeError("the generator ended the stream without output") from None

    async def __aenter__(self) -> "GenerationStream":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self._status = _status_of(exc)
        await self.close()

    async def close(self) -> None:
        """Cancel the generator call if it is still running and record the request's metrics (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.finish_reason is None and self._status == 200:
            self._status = 499  # left before the end: the client went away
        await self._aclose_chunks()
        if not self.ctx.admitted:
            self.core.release()
        self.metrics.finish(self._status, prompt_tokens=self.prompt_tokens)

    async def _aclose_chunks(self) -> None:
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            await chunks.aclose()  # cancels the RPC: the generator aborts the request and frees its KV blocks

    def _embed_rows(self) -> int | None:
        """Embedding rows the prompt has room for: max_model_len less its other tokens and max_tokens (each
        item's one placeholder is replaced by its rows)."""
        limit, p = self.core.info.max_model_len, self.prepared
        if limit is None:
            return None
        return limit - (len(p.prompt_token_ids) - len(p.media)) - (p.sampling.max_tokens or 1)

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeoutError(f"the request did not finish within {self.core.cfg.request_timeout_s:g} s "
                                      f"(--request-timeout)")
        return left

    # ---- output --------------------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[Delta]:
        try:
            while self.finish_reason is None:
                if self._first is not None:
                    chunk, self._first = self._first, None
                else:
                    if self._chunks is None:
                        raise CancelledError("the stream was closed")
                    # No per-token timer: the Generate call itself carries the request's deadline.
                    try:
                        chunk = await self._chunks.__anext__()
                    except StopAsyncIteration:
                        raise MMPipeError("the generator ended the stream before finishing the request") from None
                    except ServiceUnavailableError:
                        if self.deadline - time.monotonic() < DEADLINE_SLACK_S:
                            raise RequestTimeoutError(f"the request did not finish within "
                                                      f"{self.core.cfg.request_timeout_s:g} s (--request-timeout)"
                                                      ) from None
                        raise
                delta = self._consume(chunk)
                if delta is not None:
                    yield delta
        except BaseException as e:
            self._status = _status_of(e)
            raise
        if self.finish_reason is not None:
            await self._aclose_chunks()  # the last message has come: this only releases the call

    def _consume(self, chunk: Any) -> Delta | None:
        """One Generate message as a Delta of its sample: its tokens, logprobs and the generator's text."""
        self.prompt_tokens = chunk.num_prompt_tokens or self.prompt_tokens
        if chunk.index == 0:  # the first sample's admission is the prompt's (the others share its blocks)
            self.cached_tokens = chunk.num_cached_tokens or self.cached_tokens
        if not 0 <= chunk.index < len(self.samples):
            raise MMPipeError(f"the generator sent sample {chunk.index} of a request with n={len(self.samples)}")
        sample = self.samples[chunk.index]
        if chunk.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = chunk.prompt_logprobs
        ids = chunk.token_ids
        lps = (chunk.logprobs or []) if self.want_logprobs else None
        tops = (chunk.top_logprobs or []) if sample.top_logprobs is not None else None
        sample.token_ids.extend(ids)
        if sample.logprobs is not None and lps:
            sample.logprobs.extend(lps)
        if sample.top_logprobs is not None and tops:
            sample.top_logprobs.extend(tops)
        self.metrics.tokens(len(ids))
        text = chunk.text
        if text:
            sample.text.append(text)
        if chunk.finished and sample.finish_reason is None:
            sample.finish_reason = chunk.finish_reason or "stop"
            self._unfinished -= 1
            if self._unfinished == 0:
                self.finish_reason = sample.finish_reason
        elif not (text or ids):
            return None
        return Delta(text=text, token_ids=ids, logprobs=lps, finish_reason=sample.finish_reason if chunk.finished
                     else None, index=chunk.index, top_logprobs=tops)

    @property
    def text(self) -> str:
        """The text streamed so far (of the first sample)."""
        return "".join(self.samples[0].text)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far, all samples together (OpenAI's usage.completion_tokens)."""
        return sum(len(s.token_ids) for s in self.samples)

    def results(self) -> list[Completion]:
        return [Completion(text="".join(s.text), token_ids=list(s.token_ids),
                           logprobs=list(s.logprobs) if s.logprobs is not None else None,
                           finish_reason=s.finish_reason, prompt_tokens=self.prompt_tokens,
                           prompt_token_ids=list(self.prepared.prompt_token_ids), cached_tokens=self.cached_tokens,
                           top_logprobs=list(s.top_logprobs) if s.top_logprobs is not None else None,
                           prompt_logprobs=self.prompt_logprobs)
                for s in self.samples]

    def result(self) -> Completion:
        return self.results()[0]


@dataclass
class _Sample:
    """The output so far of one sample (n > 1) of a request."""

    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None


async def _within(deadline: float, aw):
    """Await `aw`, failing with the request timeout error at the request's deadline."""
    left = deadline - time.monotonic()
    try:
        async with asyncio.timeout(max(left, 0.001)):  # no extra task per token, unlike wait_for
            return await aw
    except TimeoutError:
        raise RequestTimeoutError("the request did not finish within the request timeout "
                                  "(--request-timeout)") from None


def _status_of(e: BaseException) -> int:
    if isinstance(e, MMPipeError):
        return e.http_status
    if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
        return 499
    return 500
