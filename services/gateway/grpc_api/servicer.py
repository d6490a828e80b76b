"""The public gRPC API (mmpipe.v1.Gateway): protobuf -> domain input -> the core -> CompletionChunks.

Thin on purpose: the same `GatewayCore` serves the HTTP API, so both apply the same checks; errors map
through the one table in shared/errors.py (`grpc_code`), with the error class and param in trailing
metadata (as between the stages) so `mmpipe.client` can rebuild the same exception.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from mmpipe.services.common.grpc_server import error_status
from mmpipe.services.common.logs import REQUEST_ID
from mmpipe.services.common.pb import gateway_pb2, gateway_pb2_grpc
from mmpipe.shared.errors import AuthenticationError, InvalidInputError, MMPipeError
from mmpipe.shared.types import SamplingParams

from ..core import GatewayCore, GenerationStream
from ..http.auth import TENANT_HEADER, authenticate
from ..http.request_id import HEADER as REQUEST_ID_HEADER
from ..http.request_id import sane_request_id
from ..metrics import count_request
from ..types import ChatInput, CompletionInput, RequestContext

logger = logging.getLogger(__name__)

_URL_PARTS = ("image_url", "video_url", "audio_url")


def sampling_from_pb(pb: gateway_pb2.SamplingOptions) -> SamplingParams:
    kw: dict[str, Any] = {"stop": list(pb.stop), "stop_token_ids": list(pb.stop_token_ids)}
    for name in ("temperature", "top_p", "top_k", "max_tokens", "min_tokens", "seed", "ignore_eos",
                 "skip_special_tokens"):
        if pb.HasField(name):
            kw[name] = getattr(pb, name)
    if "top_k" in kw and kw["top_k"] < 0:
        kw["top_k"] = 0
    kw.setdefault("max_tokens", None)  # unset: what is left of the context, as in the chat API
    if pb.HasField("logprobs") and pb.logprobs:
        kw["logprobs"] = 0
    return SamplingParams(**kw)


def part_to_dict(part: gateway_pb2.ContentPart, where: str) -> dict[str, Any]:
    """One ContentPart as the OpenAI content-part dict the shared chat parser takes."""
    which = part.WhichOneof("part")
    if which is None:
        raise InvalidInputError(f"{where} sets none of text, image_url, video_url, audio_url, input_audio, "
                                f"image_embeds", param=where)
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


def chat_input_from_pb(req: gateway_pb2.ChatRequest) -> ChatInput:
    messages = [{"role": m.role, "content": [part_to_dict(p, f"messages[{i}].content[{j}]")
                                             for j, p in enumerate(m.content)]}
                for i, m in enumerate(req.messages)]
    return ChatInput(messages=messages, sampling=sampling_from_pb(req.sampling), model=req.model or None,
                     chat_template=req.chat_template or None,
                     add_generation_prompt=req.add_generation_prompt if req.HasField("add_generation_prompt")
                     else True)


def completion_input_from_pb(req: gateway_pb2.CompletionRequest) -> CompletionInput:
    which = req.WhichOneof("prompt")
    if which is None:
        raise InvalidInputError("set prompt text or token_ids", param="prompt")
    return CompletionInput(sampling=sampling_from_pb(req.sampling), model=req.model or None,
                           prompt=req.text if which == "text" else None,
                           prompt_token_ids=list(req.token_ids.ids) if which == "token_ids" else None)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, core: GatewayCore):
        self.core = core

    async def Chat(self, request: gateway_pb2.ChatRequest, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[gateway_pb2.CompletionChunk]:
        async for chunk in self._serve("Chat", context, lambda ctx: self.core.chat(chat_input_from_pb(request), ctx)):
            yield chunk

    async def Generate(self, request: gateway_pb2.CompletionRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[gateway_pb2.CompletionChunk]:
        async for chunk in self._serve("Generate", context,
                                       lambda ctx: self.core.completion(completion_input_from_pb(request), ctx)):
            yield chunk

    async def _serve(self, method: str, context: grpc.aio.ServicerContext, start
                     ) -> AsyncIterator[gateway_pb2.CompletionChunk]:
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        rid = sane_request_id(md.get(REQUEST_ID_HEADER))
        token = REQUEST_ID.set(rid)
        code = "OK"
        try:
            await context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
            tenant = authenticate(self.core.cfg, md.get("authorization"), md.get(TENANT_HEADER))
            stream: GenerationStream = await start(RequestContext(request_id=rid, endpoint=f"grpc:{method}",
                                                                  tenant=tenant))
            async with stream:
                async for d in stream:
                    msg = gateway_pb2.CompletionChunk(request_id=rid, text=d.text, token_ids=d.token_ids,
                                                      logprobs=d.logprobs or [])
                    if d.finish_reason is not None:
                        msg.finish_reason = d.finish_reason
                        msg.usage.prompt_tokens = stream.prompt_tokens
                        msg.usage.completion_tokens = len(stream.token_ids)
                        msg.usage.total_tokens = stream.prompt_tokens + len(stream.token_ids)
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
            REQUEST_ID.reset(token)
