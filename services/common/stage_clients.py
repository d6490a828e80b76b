"""Async clients of the stage services, for the gateway (and for ingest, which calls the encoder).

Each client converts domain types to protobuf and back and turns gRPC failures into the same `MMPipeError`
the server raised (the class name travels in trailing metadata; otherwise `error_from_grpc_code`).
UNAVAILABLE and a client-side DEADLINE_EXCEEDED become `ServiceUnavailableError` (retryable, HTTP 503).
Every call carries the request id (`x-request-id`) and, with tracing on, the current span's `traceparent`
(`_metadata`). Calls never wait for a stage to come up (`wait_for_ready` is off): a stage that is down fails
the call at once instead of hanging it.

    clients = StageClients.connect(ingest="127.0.0.1:7001", encoder="127.0.0.1:7002",
                                   generator="127.0.0.1:7003")
    refs = await clients.ingest.ingest([MediaSource("image", url=...)], request_id=rid)
    async for chunk in clients.generator.generate(rid, token_ids, refs, SamplingParams(max_tokens=8)):
        ...
    await clients.close()
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

import grpc

from mmpipe.services.common import tracing
from mmpipe.services.common.convert import (EmbeddingRef, LookupItem, MediaSource, TokenChunk, sampling_to_pb)
from mmpipe.services.common.grpc_server import (DNS_MIN_RERESOLVE_MS, ERROR_CLASS_HEADER, ERROR_PARAM_HEADER,
                                                channel_options)
from mmpipe.services.common.logs import REQUEST_ID, REQUEST_ID_HEADER
from mmpipe.services.common.pb import encoder_pb2, encoder_pb2_grpc, generator_pb2, generator_pb2_grpc
from mmpipe.services.common.pb import ingest_pb2, ingest_pb2_grpc
from mmpipe.services.common.tls import ClientTLS
from mmpipe.shared import errors as _errors
from mmpipe.shared.errors import MMPipeError, ServiceUnavailableError, error_from_grpc_code
from mmpipe.shared.types import SamplingParams

__all__ = ["StageClients", "IngestClient", "EncoderClient", "GeneratorClient", "to_mmpipe_error", "make_channel"]


def make_channel(target: str, max_message_mb: int = 256, tls: ClientTLS | None = None, *,
                 min_reresolve_ms: int = DNS_MIN_RERESOLVE_MS) -> grpc.aio.Channel:
    """An aio channel with the stage options (sizes, keepalive, fast reconnect, round_robin over every address
    of a dns: name, re-resolved at most every `min_reresolve_ms` when a server closes a connection for its age):
    plaintext, or TLS / mTLS with `tls` (--stage-tls-* flags, services/common/tls.py)."""
    opts = channel_options(target, max_message_mb, min_reresolve_ms=min_reresolve_ms)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=opts)
    # gRPC takes max(min_reconnect_backoff, current backoff) as the deadline of one connection attempt: the
    # 200 ms of the plaintext options is too short for a TLS handshake with a busy peer ("timed out before
    # receiving SETTINGS frame"). The backoff between attempts (initial/max) stays as it is.
    opts = [o for o in opts if o[0] != "grpc.min_reconnect_backoff_ms"] + [("grpc.min_reconnect_backoff_ms", 5000)]
    return grpc.aio.secure_channel(target, tls.credentials(), options=opts + tls.channel_options())


def to_mmpipe_error(e: grpc.aio.AioRpcError, stage: str) -> MMPipeError:
    """The domain error a stage raised (same class and message), or a retryable 503 for transport failures."""
    code = e.code()
    details = e.details() or code.name
    cls_name = param = None
    for k, v in (e.trailing_metadata() or ()):
        if k == ERROR_CLASS_HEADER:
            cls_name = v
        elif k == ERROR_PARAM_HEADER:
            param = v
    cls = getattr(_errors, cls_name, None) if cls_name else None
    if isinstance(cls, type) and issubclass(cls, MMPipeError) and cls.grpc_code == code.name:
        return cls(details, param=param)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ServiceUnavailableError(f"the {stage} stage is unavailable ({code.name}): {details}")
    err = error_from_grpc_code(code.name, f"{stage}: {details}")
    err.param = param
    return err


def _metadata(request_id: str | None) -> tuple[tuple[str, str], ...]:
    """Every stage call's metadata: `x-request-id` and, when tracing, the current span's W3C `traceparent`
    (read by the callee's StageInterceptor, services/common/grpc_server.py)."""
    rid = request_id or REQUEST_ID.get()
    md = [(REQUEST_ID_HEADER, rid)] if rid else []
    if tracing.enabled():
        tracing.inject(md)
    return tuple(md)


class _Client:
    stage = "?"

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float | None = None):
        self.channel = channel
        self.timeout_s = timeout_s

    async def _unary(self, fn, request, request_id: str | None, timeout_s: float | None):
        try:
            return await fn(request, metadata=_metadata(request_id), timeout=timeout_s or self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise to_mmpipe_error(e, self.stage) from None

    async def close(self) -> None:
        await self.channel.close()


def _json(kw: dict | str | None) -> str:
    """A kwargs object for a *_kwargs_json field: JSON text as given, an object as JSON, none as ""."""
    if isinstance(kw, str):
        return kw
    return json.dumps(kw) if kw else ""


class IngestClient(_Client):
    stage = "ingest"

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float | None = None):
        super().__init__(channel, timeout_s)
        self.stub = ingest_pb2_grpc.IngestStub(channel)

    async def ingest(self, items: Sequence[MediaSource], *, request_id: str | None = None, tenant: str = "",
                     media_io_kwargs: dict | str | None = None, mm_processor_kwargs: dict | str | None = None,
                     timeout_s: float | None = None) -> list[EmbeddingRef]:
        req = ingest_pb2.IngestRequest(request_id=request_id or "", items=[i.to_pb() for i in items],
                                       tenant=tenant or "", media_io_kwargs_json=_json(media_io_kwargs),
                                       mm_processor_kwargs_json=_json(mm_processor_kwargs))
        resp = await self._unary(self.stub.Ingest, req, request_id, timeout_s)
        return [EmbeddingRef.from_pb(r) for r in resp.items]


@dataclass(frozen=True)
class ProcessedPayload:
    """One preprocessed item for Encoder.Encode: `tensors` is a serde.pack_tensors payload."""

    key: str
    modality: str
    tensors: bytes
    content_hash: str = ""
    uuid: str = ""


class EncoderClient(_Client):
    stage = "encoder"

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float | None = None):
        super().__init__(channel, timeout_s)
        self.stub = encoder_pb2_grpc.EncoderStub(channel)

    async def encode(self, items: Sequence[ProcessedPayload], *, request_id: str | None = None,
                     timeout_s: float | None = None) -> list[EmbeddingRef]:
        req = encoder_pb2.EncodeRequest(request_id=request_id or "", items=[
            encoder_pb2.ProcessedInput(key=i.key, modality=i.modality, tensors=i.tensors,
                                       content_hash=i.content_hash, uuid=i.uuid) for i in items])
        resp = await self._unary(self.stub.Encode, req, request_id, timeout_s)
        return [EmbeddingRef.from_pb(r) for r in resp.items]

    async def put_embeddings(self, items: Sequence[tuple[str, Any, str | None]], *, request_id: str | None = None,
                             tenant: str = "", media_io_kwargs: dict | str | None = None,
                             mm_processor_kwargs: dict | str | None = None,
                             timeout_s: float | None = None) -> list[EmbeddingRef]:
        """items: (modality, value, uuid); value is a tensor ((N, F, H) or (F, H)), a list of (F, H) tensors,
        or the family's dict form ({"image_embeds": ..., "image_grid_thw": ...}). Returns one ref per item."""
        from mmpipe.shared.cache.serde import pack_tensors  # torch: only when embeddings are sent

        pbs = []
        for modality, value, uuid in items:
            if isinstance(value, dict):
                tensors = dict(value)
            elif isinstance(value, (list, tuple)):
                tensors = {f"embeds.{i}": t for i, t in enumerate(value)}
            else:
                tensors = {"embeds": value}
            pbs.append(encoder_pb2.EmbeddingsInput(modality=modality, tensors=pack_tensors(tensors),
                                                   uuid=uuid or ""))
        req = encoder_pb2.PutEmbeddingsRequest(request_id=request_id or "", items=pbs, tenant=tenant or "",
                                               media_io_kwargs_json=_json(media_io_kwargs),
                                               mm_processor_kwargs_json=_json(mm_processor_kwargs))
        resp = await self._unary(self.stub.PutEmbeddings, req, request_id, timeout_s)
        return [EmbeddingRef.from_pb(r) for r in resp.items]

    async def lookup(self, items: Sequence[LookupItem], *, request_id: str | None = None, tenant: str = "",
                     media_io_kwargs: dict | str | None = None, mm_processor_kwargs: dict | str | None = None,
                     timeout_s: float | None = None) -> list[tuple[bool, EmbeddingRef]]:
        req = encoder_pb2.LookupRequest(request_id=request_id or "", items=[i.to_pb() for i in items],
                                        tenant=tenant or "", media_io_kwargs_json=_json(media_io_kwargs),
                                        mm_processor_kwargs_json=_json(mm_processor_kwargs))
        resp = await self._unary(self.stub.Lookup, req, request_id, timeout_s)
        return [(r.found, EmbeddingRef.from_pb(r.ref)) for r in resp.items]


class GeneratorClient(_Client):
    stage = "generator"

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float | None = None):
        super().__init__(channel, timeout_s)
        self.stub = generator_pb2_grpc.GeneratorStub(channel)

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int], embeddings: Sequence[EmbeddingRef],
                       sampling: SamplingParams, *, return_text: bool = False,
                       timeout_s: float | None = None) -> AsyncIterator[TokenChunk]:
        """Stream TokenChunks; closing the iterator early (break / aclose / task cancel) cancels the RPC,
        which aborts the request in the generator's engine."""
        req = generator_pb2.GenerateTokensRequest(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids),
            embeddings=[e.to_pb() for e in embeddings], sampling=sampling_to_pb(sampling), return_text=return_text)
        call = self.stub.Generate(req, metadata=_metadata(request_id), timeout=timeout_s or self.timeout_s)
        try:
            async for pb in call:
                yield TokenChunk.from_pb(pb)
        except grpc.aio.AioRpcError as e:
            raise to_mmpipe_error(e, self.stage) from None
        finally:
            if not call.done():
                call.cancel()


class StageClients:
    """The three stage clients of one gateway (any of them may be None)."""

    def __init__(self, ingest: IngestClient | None, encoder: EncoderClient | None,
                 generator: GeneratorClient | None):
        self.ingest = ingest
        self.encoder = encoder
        self.generator = generator

    @classmethod
    def connect(cls, *, ingest: str | None = None, encoder: str | None = None, generator: str | None = None,
                max_message_mb: int = 256, timeout_s: float | None = None,
                tls: ClientTLS | None = None) -> "StageClients":
        """Clients for the given targets (host:port, or dns:///name:port for round-robin over replicas)."""
        return cls(IngestClient(make_channel(ingest, max_message_mb, tls), timeout_s) if ingest else None,
                   EncoderClient(make_channel(encoder, max_message_mb, tls), timeout_s) if encoder else None,
                   GeneratorClient(make_channel(generator, max_message_mb, tls), timeout_s) if generator else None)

    async def close(self) -> None:
        for c in (self.ingest, self.encoder, self.generator):
            if c is not None:
                await c.close()
