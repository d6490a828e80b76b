"""The gateway's view of the three stages: look-ups, ingest, user embeddings, generation and health.

A thin adapter over the shared async stage clients (services/common/stage_clients.py), which forward the
request id in `x-request-id` metadata and turn gRPC failures into the domain errors of the one errors
table. This module only adds what the gateway needs on top: (modality, uuid) look-ups, exactly one ref per
`image_embeds` part, the `how` of each ref for the gateway's cache metrics, and gRPC health of every stage.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmpipe.services.common.convert import EmbeddingRef, LookupItem, MediaSource, TokenChunk
from mmpipe.services.common.stage_clients import StageClients as _Clients
from mmpipe.services.common.tls import ClientTLS
from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.types import SamplingParams

from .metrics import STAGE_ERRORS
from .types import MediaKwargs, MediaRef, RequestContext

STAGES = ("ingest", "encoder", "generator")


class StageClients:
    """The gateway's stage calls over long-lived channels (one per stage, reconnecting within ~2 s)."""

    def __init__(self, ingest_addr: str, encoder_addr: str, generator_addr: str, *,
                 media_io_kwargs: dict[str, Any] | None = None, tls: ClientTLS | None = None):
        self.addrs = {"ingest": ingest_addr, "encoder": encoder_addr, "generator": generator_addr}
        self.clients = _Clients.connect(ingest=ingest_addr, encoder=encoder_addr, generator=generator_addr,
                                        tls=tls)
        self.media_io_kwargs = dict(media_io_kwargs or {}) or None
        self.default_kwargs = MediaKwargs(media_io_kwargs=self.media_io_kwargs)
        self._health = {s: health_pb2_grpc.HealthStub(getattr(self.clients, s).channel) for s in STAGES}

    async def close(self) -> None:
        await self.clients.close()

    async def _counted(self, stage: str, coro):
        try:
            return await coro
        except Exception as e:
            STAGE_ERRORS.labels(stage, getattr(e, "grpc_code", type(e).__name__)).inc()
            raise

    # ---- encoder: look-ups and user embeddings -----------------------------------------------------
    async def lookup_uuids(self, items: list[tuple[str, str]], ctx: RequestContext, timeout: float,
                           kw: MediaKwargs | None = None) -> list[tuple[bool, EmbeddingRef]]:
        """(modality, uuid) -> (found, the cached item's ref or, on a miss, the key to store it under). No
        tensors move; services/common/uuids.py decides what a result means."""
        if not items:
            return []
        kw = kw or self.default_kwargs
        return await self._counted("encoder", self.clients.encoder.lookup(
            [LookupItem(modality=m, uuid=u) for m, u in items], request_id=ctx.request_id,
            tenant=ctx.tenant or "", media_io_kwargs=kw.media_io_kwargs, mm_processor_kwargs=kw.mm_processor_kwargs,
            timeout_s=timeout))

    async def put_embeddings(self, items: list[tuple[str, Any, str | None]], ctx: RequestContext,
                             timeout: float, kw: MediaKwargs | None = None) -> list[MediaRef]:
        """(modality, tensor or dict of tensors, uuid) per image_embeds part -> exactly one ref per part."""
        if not items:
            return []
        kw = kw or self.default_kwargs
        refs = await self._counted("encoder", self.clients.encoder.put_embeddings(
            items, request_id=ctx.request_id, tenant=ctx.tenant or "", media_io_kwargs=kw.media_io_kwargs,
            mm_processor_kwargs=kw.mm_processor_kwargs, timeout_s=timeout))
        if len(refs) != len(items):
            raise InvalidInputError(f"{len(items)} image_embeds part(s) held {len(refs)} embedding items; each "
                                    f"part must hold exactly one item (use one part per item)", param="image_embeds")
        return [MediaRef.of(r, "embeds") for r in refs]

    # ---- ingest ------------------------------------------------------------------------------------
    async def ingest(self, items: list[MediaSource], ctx: RequestContext, timeout: float,
                     kw: MediaKwargs | None = None) -> list[MediaRef]:
        """Media items -> refs; ingest hashes, checks the cache, and encodes only misses. `kw`: the request's
        media settings (default: the gateway's --media-io-kwargs)."""
        if not items:
            return []
        kw = kw or self.default_kwargs
        refs = await self._counted("ingest", self.clients.ingest.ingest(
            items, request_id=ctx.request_id, tenant=ctx.tenant or "", media_io_kwargs=kw.media_io_kwargs,
            mm_processor_kwargs=kw.mm_processor_kwargs, timeout_s=timeout))
        return [MediaRef.of(r, "hash" if r.cache_hit else "miss") for r in refs]

    # ---- generator ---------------------------------------------------------------------------------
    def generate(self, prompt_token_ids: list[int], refs: list[MediaRef], sampling: SamplingParams,
                 ctx: RequestContext, timeout: float) -> AsyncIterator[TokenChunk]:
        """The token stream with the generator's text deltas (it detokenises and applies stop strings);
        `aclose()` it to cancel the call (the generator frees the batch slot)."""
        return self.clients.generator.generate(ctx.request_id, prompt_token_ids, [r.pb for r in refs], sampling,
                                               return_text=True, timeout_s=timeout)

    # ---- health ------------------------------------------------------------------------------------
    async def health(self, timeout: float = 1.0) -> dict[str, str]:
        """stage -> SERVING / NOT_SERVING / ... or the gRPC code of a failed check (UNAVAILABLE: no answer)."""

        async def one(stage: str) -> tuple[str, str]:
            try:
                r = await self._health[stage].Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
                return stage, health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except grpc.aio.AioRpcError as e:
                return stage, e.code().name

        return dict(await asyncio.gather(*(one(s) for s in STAGES)))
