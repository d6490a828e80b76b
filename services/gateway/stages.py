"""The gateway's view of the three stages: look-ups, ingest, user embeddings, generation and health.

A thin adapter over the shared async stage clients (services/common/stage_clients.py), which forward the
request id in `x-request-id` metadata and turn gRPC failures into the domain errors of the one errors
table. This module only adds what the gateway needs on top: (modality, uuid) look-ups, exactly one ref per
`image_embeds` part, the `how` of each ref for the gateway's cache metrics, the choice of a generator replica
per request (`routing.Router`, with several --generator-addr), and gRPC health of every stage.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmpipe.services.common.convert import EmbeddingRef, LookupItem, MediaSource, TokenChunk
from mmpipe.services.common.stage_clients import GeneratorClient, make_channel
from mmpipe.services.common.stage_clients import StageClients as _Clients
from mmpipe.services.common.tls import ClientTLS
from mmpipe.shared.errors import InvalidInputError, ServiceUnavailableError
from mmpipe.shared.types import SamplingParams

from .metrics import STAGE_ERRORS
from .routing import Router, RoutingConfig, split_addrs
from .types import MediaKwargs, MediaRef, RequestContext

STAGES = ("ingest", "encoder", "generator")


class StageClients:
    """The gateway's stage calls over long-lived channels (one per stage, reconnecting within ~2 s)."""

    def __init__(self, ingest_addr: str, encoder_addr: str, generator_addr: str | list[str], *,
                 media_io_kwargs: dict[str, Any] | None = None, tls: ClientTLS | None = None,
                 routing: RoutingConfig | None = None, placeholder_ids: dict[str, int] | None = None,
                 model: str = ""):
        """`generator_addr`: one address, or several (comma separated or a list): one replica each, chosen per
        request by `routing` (services/gateway/routing.py)."""
        gen_addrs = split_addrs(generator_addr)
        self.addrs = {"ingest": ingest_addr, "encoder": encoder_addr, "generator": ",".join(gen_addrs)}
        self.clients = _Clients.connect(ingest=ingest_addr, encoder=encoder_addr, generator=gen_addrs[0], tls=tls)
        self.generators = [self.clients.generator] + [GeneratorClient(make_channel(a, tls=tls)) for a in gen_addrs[1:]]
        self.router = Router(gen_addrs, routing or RoutingConfig(), placeholder_ids, model)
        self.media_io_kwargs = dict(media_io_kwargs or {}) or None
        self.default_kwargs = MediaKwargs(media_io_kwargs=self.media_io_kwargs)
        self._health = {s: health_pb2_grpc.HealthStub(getattr(self.clients, s).channel) for s in STAGES}
        self._generator_health = [health_pb2_grpc.HealthStub(g.channel) for g in self.generators]

    async def close(self) -> None:
        await self.clients.close()
        for g in self.generators[1:]:
            await g.close()

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
    async def generate(self, prompt_token_ids: list[int], refs: list[MediaRef], sampling: SamplingParams,
                       ctx: RequestContext, timeout: float) -> AsyncIterator[TokenChunk]:
        """The token stream with the generator's text deltas (it detokenises and applies stop strings), from the
        replica the router picks; the call counts as in flight there until the stream ends. `aclose()` it to
        cancel the call (the generator frees the batch slot)."""
        route = self.router.pick(prompt_token_ids, refs, ctx.session)
        with self.router.hold(route.replica):
            chunks = self.generators[route.replica].generate(ctx.request_id, prompt_token_ids, [r.pb for r in refs],
                                                            sampling, return_text=True, timeout_s=timeout)
            first, t0 = True, time.monotonic()
            try:
                async for chunk in chunks:
                    first = False
                    yield chunk
            except ServiceUnavailableError:
                # Nothing came and the deadline had not passed (a client-side DEADLINE_EXCEEDED is the request's
                # timeout, not the replica): the core retries once, and that call should go to another replica.
                if first and time.monotonic() - t0 < timeout:
                    self.router.mark_down(route.replica)
                raise
            finally:
                await chunks.aclose()

    # ---- health ------------------------------------------------------------------------------------
    async def health(self, timeout: float = 1.0) -> dict[str, str]:
        """stage -> SERVING / NOT_SERVING / ... or the gRPC code of a failed check (UNAVAILABLE: no answer). With
        several generator replicas, "generator" is SERVING only while every one of them is (else the first
        other answer), so a replica that is down shows."""

        async def one(stub) -> str:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
                return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except grpc.aio.AioRpcError as e:
                return e.code().name

        ingest, encoder, *generators = await asyncio.gather(one(self._health["ingest"]), one(self._health["encoder"]),
                                                            *(one(h) for h in self._generator_health))
        generator = next((g for g in generators if g != "SERVING"), "SERVING")
        return {"ingest": ingest, "encoder": encoder, "generator": generator}
