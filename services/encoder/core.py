"""The encoder's work, free of gRPC: encode processed items, store user embeddings, look keys up.

Writes go to Redis before Encode returns (a generator handed the key must be able to read it); the write
is pipelined and zero-copy (RedisEmbeddingCache.put_many). Look-ups read only payload headers (meta_peek).

Timing (services/common/steps.py): mmpipe_encoder_step_duration_seconds{step} has each item's queue (submitted
until its tower batch starts), each batch's finish (uint8 pixels to the device and normalised) and each Encode's
cache_write; the tower of each batch stays mmpipe_encoder_encode_duration_seconds{modality}. On CUDA both batch
steps end with a device sync, so the tower's time is the tower's and not the cache write's (the next batch's
host-to-device copy would wait for it anyway).
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import blake3
import redis

from mmpipe.services.common import tracing
from mmpipe.services.common.convert import EmbeddingRef, LookupItem
from mmpipe.services.common.warmup import warmup_items
from mmpipe.services.encoder.batcher import DynamicBatcher
from mmpipe.services.encoder.keyspaces import Keyspaces
from mmpipe.services.encoder.tenant_share import TenantCacheShare, cache_capacity_bytes
from mmpipe.shared.cache.meta_peek import peek_headers
from mmpipe.shared.cache.serde import CacheCorruptError, pack_embedding, unpack_tensors
from mmpipe.shared.errors import InvalidInputError, MMPipeError, ServiceUnavailableError, UnsupportedError
from mmpipe.shared.types import MMEmbedding, ProcessedItem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeItem:
    key: str
    modality: str
    tensors: bytes
    content_hash: str = ""
    uuid: str = ""


@dataclass(frozen=True)
class _BatchTimes:
    """When one tower batch ran (time.perf_counter): started, pixels finished on the device, tower done."""

    start: float
    finished: float
    end: float


def _device_clock(device: Any) -> float:
    """time.perf_counter once the work queued on `device` has run (CUDA kernels are asynchronous)."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass(frozen=True)
class EmbedsItem:
    modality: str
    tensors: bytes
    uuid: str = ""


def _ref(key: str, emb_or_header: Any, *, content_hash: str = "", uuid: str = "", hit: bool = False) -> EmbeddingRef:
    if isinstance(emb_or_header, MMEmbedding):
        meta, modality = dict(emb_or_header.meta), emb_or_header.modality
        n = int(emb_or_header.tensor.shape[0])
    else:
        meta, modality = dict(emb_or_header.get("meta") or {}), emb_or_header.get("modality", "")
        shapes = [t.get("shape") for t in emb_or_header.get("tensors", [])]
        n = int(meta.get("num_tokens") or (shapes[0][0] if shapes and shapes[0] else 0))
    return EmbeddingRef(key=key, modality=modality, num_tokens=n, meta=meta, content_hash=content_hash,
                        cache_hit=hit, uuid=uuid)


class EncoderCore:
    def __init__(self, cfg, adapter, cache, redis_client, metrics):
        self.cfg = cfg
        self.adapter = adapter
        self.cache = cache
        self.redis = redis_client
        self.keyspaces = Keyspaces(cfg.model, adapter, cfg.media_io_kwargs)
        share = getattr(cfg, "tenant_cache_share", 0.0) or 0.0
        capacity = cache_capacity_bytes(redis_client, getattr(cfg, "cache_capacity_mb", None)) if share > 0 else 0
        self.tenant_share = TenantCacheShare(redis_client, limit_bytes=int(share * capacity),
                                             window_s=getattr(cfg, "tenant_cache_window_s", 600.0))
        if share > 0:
            log.info("tenant cache share: %s", f"{self.tenant_share.limit_bytes} bytes per tenant per "
                     f"{self.tenant_share.window_s:g} s" if self.tenant_share.enabled else "off (no capacity known)")
        self.tower = ThreadPoolExecutor(1, thread_name_prefix="tower")  # one model, one thread
        self.io = ThreadPoolExecutor(4, thread_name_prefix="redis-io")
        m = metrics
        self.m_batch = m.histogram("batch_size", "items per tower batch", (1, 2, 4, 8, 16, 32, 64), ("modality",))
        self.m_encode_s = m.histogram("encode_duration_seconds", "tower time per batch",
                                      (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), ("modality",))
        self.m_items = m.counter("items_encoded", "items run through the towers", ("modality",))
        self.m_queue = m.gauge("queue_depth", "items waiting for a tower batch")
        self.m_lookups = m.counter("cache_lookups", "Lookup items by result", ("result",))
        self.m_bytes_in = m.counter("received_bytes", "tensor payload bytes received", ("rpc",))
        self.m_bytes_out = m.counter("cache_written_bytes", "embedding bytes written to the cache")
        self.m_puts = m.counter("user_embeddings", "user-supplied embeddings stored", ("modality",))
        self.steps = m.steps()
        self.model_label = m.model
        self.batcher = DynamicBatcher(self._run_batch, max_items=cfg.max_batch_items, wait_ms=cfg.batch_wait_ms,
                                      executor=self.tower, on_batch=self._on_batch,
                                      on_queue=lambda d: self.m_queue.labels(self.model_label).set(d),
                                      max_queued=cfg.max_queued_items)

    def _on_batch(self, modality: str, n: int, _secs: float) -> None:
        self.m_batch.labels(self.model_label, modality).observe(n)

    # ---- Encode ----------------------------------------------------------------------------------------
    def _run_batch(self, modality: str, items: list[ProcessedItem]) -> list[Any]:
        """Tower thread: finish the pixels and encode a batch; on failure, retry item by item so one bad item
        fails alone. Each result is (embedding, _BatchTimes) or that item's exception."""
        t0 = t1 = time.perf_counter()
        try:
            finished = self.adapter.finish(modality, items)
            t1 = _device_clock(self.adapter.device)
            embs: list[Any] = self.adapter.encode(modality, finished)
        except MMPipeError:
            raise
        except Exception:  # noqa: BLE001 - isolate the culprit
            if len(items) == 1:
                raise
            embs = []
            for it in items:
                try:
                    embs.extend(self.adapter.encode(modality, [it]))
                except Exception as e:  # noqa: BLE001
                    embs.append(e)
        t2 = _device_clock(self.adapter.device)
        self.steps.record("finish", t0, t1, span=False)  # per batch; each request's trace gets its own (encode)
        self.m_encode_s.labels(self.model_label, modality).observe(t2 - t1)
        good = [(it.key, e) for it, e in zip(items, embs) if isinstance(e, MMEmbedding)]
        self.m_items.labels(self.model_label, modality).inc(len(good))
        times = _BatchTimes(t0, t1, t2)
        return [e if isinstance(e, BaseException) else (e, times) for e in embs]

    def _batch_steps(self, submitted: float, times: list[_BatchTimes]) -> None:
        """Each item's wait for its tower batch; with tracing, this request's spans of the batches it was in."""
        for t in times:
            self.steps.observe("queue", t.start - submitted)
        if tracing.enabled():
            for t in {id(t): t for t in times}.values():
                tracing.record("queue", submitted, t.start)
                tracing.record("finish", t.start, t.finished)
                tracing.record("tower", t.finished, t.end)

    def _decode_item(self, it: EncodeItem) -> ProcessedItem:
        self.keyspaces.check_key(it.key)
        self.adapter.check_modality(it.modality)
        try:
            tensors, meta = unpack_tensors(it.tensors)
        except CacheCorruptError as e:
            raise InvalidInputError(f"processed tensors of {it.modality} item: {e}", param="tensors") from None
        self.adapter.pixel_wire.check_payload(it.modality, tensors, self.adapter.model.dtype)
        if not isinstance(meta.get("num_tokens"), int) or meta["num_tokens"] < 1:
            raise InvalidInputError("processed item meta needs num_tokens >= 1", param="tensors")
        return ProcessedItem(modality=it.modality, key=it.key, tensors=tensors, meta=meta)

    async def encode(self, items: list[EncodeItem]) -> list[EmbeddingRef]:
        self.m_bytes_in.labels(self.model_label, "Encode").inc(sum(len(i.tensors) for i in items))
        processed = [self._decode_item(it) for it in items]  # validate all before any work
        submitted = time.perf_counter()
        results = await asyncio.gather(*[self.batcher.submit(p.modality, p.key, p) for p in processed])
        embs = [e for e, _ in results]
        self._batch_steps(submitted, [t for _, t in results])
        loop = asyncio.get_running_loop()
        unique = {p.key: e for p, e in zip(processed, embs)}
        nbytes = sum(e.tensor.numel() * e.tensor.element_size() for e in unique.values())
        await self.steps.timed("cache_write", loop.run_in_executor(self.io, self.cache.put_many, list(unique.items())))
        self.m_bytes_out.labels(self.model_label).inc(nbytes)
        return [_ref(it.key, e, content_hash=it.content_hash, uuid=it.uuid) for it, e in zip(items, embs)]

    # ---- PutEmbeddings ---------------------------------------------------------------------------------
    def _put_sync(self, items: list[EmbedsItem], tenant: str, kw_json: str, mm_json: str = ""
                  ) -> list[EmbeddingRef]:
        if not self.cfg.enable_mm_embeds:
            raise UnsupportedError("precomputed embeddings are disabled; start the encoder with --enable-mm-embeds",
                                   param="embeds")
        ks = self.keyspaces.get(kw_json, mm_json)
        out: list[tuple[str, MMEmbedding, str, str]] = []
        for it in items:
            try:
                tensors, _ = unpack_tensors(it.tensors)
            except CacheCorruptError as e:
                raise InvalidInputError(f"{it.modality}_embeds payload: {e}", param=f"{it.modality}_embeds") from None
            names = list(tensors)
            if names == ["embeds"]:
                value: Any = tensors["embeds"]
            elif names and all(n.startswith("embeds.") for n in names):
                value = [tensors[n] for n in names]
            else:
                value = tensors
            embs = self.adapter.embeds_from_user(it.modality, value)
            if it.uuid and len(embs) != 1:
                raise InvalidInputError(f"a uuid names one item, but this {it.modality}_embeds input holds "
                                        f"{len(embs)}", param="uuid")
            for e in embs:
                e = MMEmbedding(e.modality, e.tensor.contiguous(), e.meta)
                h = blake3.blake3(pack_embedding(e)).hexdigest()
                key = ks.key(e.modality, uuid=it.uuid, tenant=tenant or None) if it.uuid else \
                    ks.key(e.modality, content_hash=h)
                out.append((key, e, h, it.uuid))
        nbytes = sum(e.tensor.numel() * e.tensor.element_size() for _, e, _, _ in out)
        try:
            self.tenant_share.charge(tenant or None, nbytes)  # before the write: refused bytes never land
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as e:
            raise ServiceUnavailableError(f"the embedding cache is unreachable during PutEmbeddings: {e}") from e
        self.cache.put_many([(k, e) for k, e, _, _ in out])
        for _, e, _, _ in out:
            self.m_puts.labels(self.model_label, e.modality).inc()
        return [_ref(k, e, content_hash=h, uuid=u) for k, e, h, u in out]

    async def put_embeddings(self, items: list[EmbedsItem], tenant: str, kw_json: str, mm_json: str = ""
                             ) -> list[EmbeddingRef]:
        self.m_bytes_in.labels(self.model_label, "PutEmbeddings").inc(sum(len(i.tensors) for i in items))
        return await asyncio.get_running_loop().run_in_executor(self.io, self._put_sync, items, tenant, kw_json,
                                                                mm_json)

    # ---- Lookup ----------------------------------------------------------------------------------------
    def _lookup_sync(self, items: list[LookupItem], tenant: str, kw_json: str, mm_json: str = ""
                     ) -> list[tuple[bool, EmbeddingRef]]:
        ks = self.keyspaces.get(kw_json, mm_json)
        keys = []
        for it in items:
            if it.key:
                self.keyspaces.check_key(it.key)
                keys.append(it.key)
            elif it.uuid:
                keys.append(ks.key(it.modality, uuid=it.uuid, tenant=tenant or None))
            elif it.content_hash:
                keys.append(ks.key(it.modality, content_hash=it.content_hash))
            else:
                raise InvalidInputError("a lookup item needs a key, a uuid or a content_hash", param="items")
        try:
            headers = peek_headers(self.redis, keys)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as e:
            # Redis down or restarting: a retryable UNAVAILABLE (the client retries), never an INTERNAL 500.
            raise ServiceUnavailableError(f"the embedding cache is unreachable during Lookup: {e}") from e
        out = []
        for it, k, h in zip(items, keys, headers):
            if h is not None and it.modality and h.get("modality") != it.modality:
                h = None
            if h is None:
                out.append((False, EmbeddingRef(key=k, modality=it.modality, content_hash=it.content_hash,
                                                uuid=it.uuid)))
            else:
                out.append((True, _ref(k, h, content_hash=it.content_hash, uuid=it.uuid, hit=True)))
        hits = sum(f for f, _ in out)
        self.m_lookups.labels(self.model_label, "hit").inc(hits)
        self.m_lookups.labels(self.model_label, "miss").inc(len(out) - hits)
        return out

    async def lookup(self, items: list[LookupItem], tenant: str, kw_json: str, mm_json: str = ""
                     ) -> list[tuple[bool, EmbeddingRef]]:
        return await asyncio.get_running_loop().run_in_executor(self.io, self._lookup_sync, items, tenant, kw_json,
                                                                mm_json)

    # ---- lifecycle -------------------------------------------------------------------------------------
    def warmup(self) -> None:
        for item in warmup_items(self.adapter):
            self.adapter.encode(item.modality, [self.adapter.preprocess(item)])

    async def close(self) -> None:
        await self.batcher.close()
        self.tower.shutdown(wait=True)
        self.io.shutdown(wait=True)
        self.cache.close()
