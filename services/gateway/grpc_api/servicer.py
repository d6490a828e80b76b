"""The public gRPC API (mmpipe.v1.Gateway): protobuf -> domain input -> the core -> CompletionChunks.

Thin on purpose: the same `GatewayCore` serves the HTTP API, so both apply the same checks; errors map
through the one table in shared/errors.py (`grpc_code`), with the error class and param in trailing
metadata (as between the stages) so `mmpipe.client` can rebuild the same exception. Chat tools go through
the HTTP path's owners: `parse_tool_request` validates them, shared/tools/output.py parses the answers.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from mmpipe.services.common.grpc_server import error_status
from mmpipe.services.common.logs import REQUEST_ID
from mmpipe.services.common.pb import gateway_pb2, gateway_pb2_grpc
from mmpipe.shared.chat.template_options import ChatTemplateOptions
from mmpipe.shared.errors import AuthenticationError, InvalidInputError, MMPipeError
from mmpipe.shared.tools.output import ToolCallStreams
from mmpipe.shared.tools.parsers import DeltaToolCall
from mmpipe.shared.tools.request import ToolRequest, parse_tool_request
from mmpipe.shared.types import SamplingParams

from ..access_log import AccessLog
from ..core import GatewayCore, GenerationStream
from ..http.auth import TENANT_HEADER, authenticate
from ..http.request_id import HEADER as REQUEST_ID_HEADER
from ..http.request_id import sane_request_id
from ..metrics import count_request
from ..types import ChatInput, CompletionInput, MediaKwargs, RequestContext, TokenizeInput

logger = logging.getLogger(__name__)

_URL_PARTS = ("image_url", "video_url", "audio_url")
SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name  # mmpipe.v1.Gateway


def sampling_from_pb(pb: gateway_pb2.SamplingOptions) -> SamplingParams:
    kw: dict[str, Any] = {"stop": list(pb.stop), "stop_token_ids": list(pb.stop_token_ids)}
    for name in ("temperature", "top_p", "top_k", "max_tokens", "min_tokens", "seed", "ignore_eos",
                 "skip_special_tokens", "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p",
                 "prompt_logprobs"):
        if pb.HasField(name):
            kw[name] = getattr(pb, name)
    if "top_k" in kw and kw["top_k"] < 0:
        kw["top_k"] = 0
    kw.setdefault("max_tokens", None)  # unset: what is left of the context, as in the chat API
    top = pb.top_logprobs if pb.HasField("top_logprobs") else 0
    if pb.HasField("logprobs") and pb.logprobs:
        kw["logprobs"] = top
    elif top:
        raise InvalidInputError("top_logprobs needs logprobs=true", param="top_logprobs")
    if pb.logit_bias:
        kw["logit_bias"] = dict(pb.logit_bias)
    if pb.bad_words:
        kw["bad_words"] = list(pb.bad_words)
    return SamplingParams(**kw)


def part_to_dict(part: gateway_pb2.ContentPart, where: str) -> dict[str, Any]:
    """One ContentPart as the OpenAI content-part dict the shared chat parser takes."""
    which = part.WhichOneof("part")
    if which is None:
        raise InvalidInputError(f"{where} sets none of text, image_url, video_url, audio_url, input_audio, "
                                f"image_embeds, audio_embeds", param=where)
    if which == "text":
        return {"type": "text", "text": part.text}
    out: dict[str, Any] = {"type": which}
    if part.HasField("uuid"):
        out["uuid"] = part.uuid
    if which in _URL_PARTS:
        url = getattr(part, which).url
        out[which] = {"url": url} if url else None
    elif which == "input_audio":
        a = part.input_audio
        out[which] = {"data": a.data, "format": a.format or "wav"} if a.data else None
    elif which == "audio_embeds":
        out[which] = part.audio_embeds.data or None
    else:
        e = part.image_embeds
        extra = {k: v for k, v in (("image_grid_thw", e.image_grid_thw), ("image_sizes", e.image_sizes)) if v}
        if not e.data:
            if extra:
                raise InvalidInputError(f"{where}.image_embeds has grid/size tensors but no data", param=where)
            out[which] = None
        else:
            out[which] = {"image_embeds": e.data, **extra} if extra else e.data
    return out


def media_kwargs_from_pb(ms: gateway_pb2.MediaSettings) -> MediaKwargs:
    """The JSON objects of a MediaSettings message (the Preparer checks their keys and values)."""
    from mmpipe.shared.models.mm_kwargs import parse_kwargs_json

    return MediaKwargs(mm_processor_kwargs=parse_kwargs_json(ms.mm_processor_kwargs_json, "mm_processor_kwargs")
                       or None,
                       media_io_kwargs=parse_kwargs_json(ms.media_io_kwargs_json, "media_io_kwargs") or None)


def chat_input_from_pb(req: gateway_pb2.ChatRequest) -> ChatInput:
    return ChatInput(messages=_messages_from_pb(req.messages), sampling=sampling_from_pb(req.sampling), model=req.model or None,
                     chat_template=req.chat_template or None, template=template_options_from_pb(req),
                     media_kwargs=media_kwargs_from_pb(req.media_settings),
                     add_special_tokens=req.add_special_tokens if req.HasField("add_special_tokens") else False,
                     tools=tool_request_from_pb(req))


def template_options_from_pb(req: gateway_pb2.ChatRequest | gateway_pb2.TokenizeRequest) -> ChatTemplateOptions:
    """The template inputs of a ChatRequest or a TokenizeRequest (the same field names), validated by shared/chat."""
    kwargs = _json_field(req.chat_template_kwargs_json, "chat_template_kwargs") \
        if req.chat_template_kwargs_json else None
    documents = None
    if req.documents:
        documents = []
        for i, d in enumerate(req.documents):
            doc: dict[str, str] = {}
            for f in d.fields:
                if f.key in doc:
                    raise InvalidInputError(f"documents[{i}] has the key {f.key!r} twice", param=f"documents[{i}]")
                doc[f.key] = f.value
            documents.append(doc)
    return ChatTemplateOptions.of(
        add_generation_prompt=req.add_generation_prompt if req.HasField("add_generation_prompt") else True,
        continue_final_message=req.continue_final_message if req.HasField("continue_final_message") else False,
        chat_template_kwargs=kwargs, documents=documents)


def tool_request_from_pb(req: gateway_pb2.ChatRequest | gateway_pb2.TokenizeRequest) -> ToolRequest | None:
    """The request's tools as the chat API's JSON, validated by the one owner of the rules (shared/tools)."""
    tools: list[dict[str, Any]] | None = None
    if req.tools:
        tools = []
        for i, t in enumerate(req.tools):
            fn: dict[str, Any] = {"name": t.name}
            if t.HasField("description"):
                fn["description"] = t.description
            if t.parameters_json:
                fn["parameters"] = _json_field(t.parameters_json, f"tools[{i}].function.parameters")
            if t.HasField("strict"):
                fn["strict"] = t.strict
            tools.append({"type": "function", "function": fn})
    which = req.WhichOneof("tool_choice")
    choice: Any = None
    if which == "tool_choice_mode":
        choice = req.tool_choice_mode
    elif which == "tool_choice_function":
        choice = {"type": "function", "function": {"name": req.tool_choice_function}}
    return parse_tool_request(tools, choice,
                              req.parallel_tool_calls if req.HasField("parallel_tool_calls") else None)


def _json_field(text: str, param: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise InvalidInputError(f"{param} is not valid JSON: {e}", param=param) from None


def completion_input_from_pb(req: gateway_pb2.CompletionRequest) -> CompletionInput:
    which = req.WhichOneof("prompt")
    if which is None:
        raise InvalidInputError("set prompt text or token_ids", param="prompt")
    return CompletionInput(sampling=sampling_from_pb(req.sampling), model=req.model or None,
                           prompt=req.text if which == "text" else None,
                           prompt_token_ids=list(req.token_ids.ids) if which == "token_ids" else None,
                           media_kwargs=media_kwargs_from_pb(req.media_settings),
                           add_special_tokens=req.add_special_tokens if req.HasField("add_special_tokens") else True)


def _messages_from_pb(messages: Any) -> list[dict[str, Any]]:
    return [_message_from_pb(m, i) for i, m in enumerate(messages)]


def _message_from_pb(m: gateway_pb2.ChatMessage, i: int) -> dict[str, Any]:
    """One message as the OpenAI dict the shared chat parser takes (which checks its tool fields)."""
    out: dict[str, Any] = {"role": m.role, "content": [part_to_dict(p, f"messages[{i}].content[{j}]")
                                                       for j, p in enumerate(m.content)]}
    if m.HasField("tool_call_id"):
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    return out


def tokenize_input_from_pb(req: gateway_pb2.TokenizeRequest) -> TokenizeInput:
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidInputError("set prompt or messages", param="prompt")
    if which == "prompt":  # as POST /tokenize: the template's inputs mean nothing without messages
        for name, given in (("chat_template_kwargs", req.chat_template_kwargs_json), ("documents", req.documents),
                            ("continue_final_message", req.continue_final_message), ("tools", req.tools),
                            ("tool_choice", req.WhichOneof("tool_choice")),
                            ("media_settings", req.HasField("media_settings"))):
            if given:
                raise InvalidInputError(f"{name} is an input of the chat template: send messages, not prompt",
                                        param=name)
    return TokenizeInput(
        prompt=req.prompt if which == "prompt" else None,
        messages=_messages_from_pb(req.messages.messages) if which == "messages" else None,
        model=req.model or None,
        add_special_tokens=req.add_special_tokens if req.HasField("add_special_tokens") else None,
        template=template_options_from_pb(req) if which == "messages" else ChatTemplateOptions(),
        chat_template=req.chat_template or None, return_token_strs=req.return_token_strs,
        tools=tool_request_from_pb(req) if which == "messages" else None,
        media_kwargs=media_kwargs_from_pb(req.media_settings) if which == "messages" else MediaKwargs())


def _tool_call_delta_pb(c: DeltaToolCall) -> gateway_pb2.ToolCallDelta:
    out = gateway_pb2.ToolCallDelta(index=c.index, arguments=c.arguments or "")
    if c.id is not None:
        out.id = c.id
    if c.name is not None:
        out.name = c.name
    return out


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, core: GatewayCore):
        self.core = core
        self.access_log = AccessLog.of(core.cfg)

    async def Chat(self, request: gateway_pb2.ChatRequest, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[gateway_pb2.CompletionChunk]:
        async for chunk in self._serve("Chat", context, lambda ctx: self.core.chat(chat_input_from_pb(request), ctx)):
            yield chunk

    async def Generate(self, request: gateway_pb2.CompletionRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[gateway_pb2.CompletionChunk]:
        echo: dict[str, str] = {}

        async def start(ctx: RequestContext) -> GenerationStream:
            inp = completion_input_from_pb(request)
            stream = await self.core.completion(inp, ctx)
            if request.echo:
                echo["text"] = self.core.echo_text(inp, stream)
            return stream

        async for chunk in self._serve("Generate", context, start, echo):
            yield chunk

    async def Tokenize(self, request: gateway_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
                       ) -> gateway_pb2.TokenizeResponse:
        async def run(ctx: RequestContext) -> gateway_pb2.TokenizeResponse:
            out = await self.core.tokenize(tokenize_input_from_pb(request))
            return gateway_pb2.TokenizeResponse(count=out.count, max_model_len=out.max_model_len or 0,
                                                tokens=out.tokens, token_strs=out.token_strs or [])
        return await self._unary("Tokenize", context, run)

    async def Detokenize(self, request: gateway_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
                         ) -> gateway_pb2.DetokenizeResponse:
        async def run(ctx: RequestContext) -> gateway_pb2.DetokenizeResponse:
            return gateway_pb2.DetokenizeResponse(prompt=self.core.detokenize(request.model or None,
                                                                              list(request.tokens)))
        return await self._unary("Detokenize", context, run)

    async def _unary(self, method: str, context: grpc.aio.ServicerContext, run) -> Any:
        """A unary call with the streaming calls' request id, authentication and error mapping."""
        calls = self._serve(method, context, run, unary=True)
        out = await calls.__anext__()
        async for _ in calls:  # runs the rest of _serve (metrics, request id reset) in this task
            pass
        return out

    async def _serve(self, method: str, context: grpc.aio.ServicerContext, start, echo: dict[str, str] | None = None,
                     *, unary: bool = False) -> AsyncIterator[Any]:
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        rid = sane_request_id(md.get(REQUEST_ID_HEADER))
        token = REQUEST_ID.set(rid)
        access = self.access_log.open("GRPC", f"/{SERVICE}/{method}")
        code = "OK"
        try:
            await context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
            tenant = authenticate(self.core.cfg, md.get("authorization"), md.get(TENANT_HEADER))
            session_key = self.core.cfg.routing.session_key
            ctx = RequestContext(request_id=rid, endpoint=f"grpc:{method}", tenant=tenant,
                                 session=md.get(session_key.lower()) if session_key else None)
            if unary:
                yield await start(ctx)
                return
            stream: GenerationStream = await start(ctx)
            tools = ToolCallStreams(stream.prepared.tools)  # chat with tools: answers parsed into calls
            prefix = (echo or {}).get("text", "")
            echoed: set[int] = set()  # samples whose first chunk carried the echo
            async with stream:
                prompt_sent = False
                async for d in stream:
                    part, finish = tools.feed(d.index, d.text, d.finish_reason)
                    text = part.content
                    if prefix and d.index not in echoed:
                        text = prefix + text
                        echoed.add(d.index)
                    msg = gateway_pb2.CompletionChunk(
                        request_id=rid, text=text, token_ids=d.token_ids, logprobs=d.logprobs or [], index=d.index,
                        top_logprobs=[gateway_pb2.TopLogprob(token_ids=[t for t, _ in alt], logprobs=[v for _, v in alt])
                                      for alt in d.top_logprobs or ()],
                        tool_calls=[_tool_call_delta_pb(c) for c in part.merged_calls()])
                    if stream.prompt_logprobs is not None and not prompt_sent:
                        prompt_sent = True
                        msg.prompt_logprobs.extend(gateway_pb2.PromptTokenLogprob(
                            token_id=tid, logprob=lp, rank=rank,
                            top=gateway_pb2.TopLogprob(token_ids=[a for a, _ in alts], logprobs=[v for _, v in alts]))
                            for tid, lp, rank, alts in stream.prompt_logprobs[1:])
                    if finish is not None:
                        msg.finish_reason = finish
                    if stream.finish_reason is not None:  # the last chunk: usage of every sample
                        msg.usage.prompt_tokens = stream.prompt_tokens
                        msg.usage.completion_tokens = stream.completion_tokens
                        msg.usage.total_tokens = stream.prompt_tokens + stream.completion_tokens
                    yield msg
        except MMPipeError as e:
            code = e.grpc_code
            if not isinstance(e, AuthenticationError) and e.http_status >= 500:
                logger.warning("%s failed: %s %s", method, e.grpc_code, e.message)
            status, details, md_out = error_status(e)
            context.set_trailing_metadata(md_out)
            await context.abort(status, details)
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"  # the client went away; `async with stream` cancelled the generator call
            raise
        except Exception as e:
            code = "INTERNAL"
            logger.exception("%s failed with an unexpected error", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__})")
        finally:
            count_request(self.core.model_name, f"grpc:{method}", code)
            self.access_log.close(access, code, rid)
            REQUEST_ID.reset(token)
