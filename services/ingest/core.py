"""The ingest stage's work, free of gRPC: media sources -> cache references.

Order of work per request, so that cached media costs as little as possible:
  1. items with a UUID: ask the encoder (Lookup) -> a hit needs no fetch at all; a UUID-only miss is an error
     (services/common/uuids.py, the rule the gateway applies too); an item that comes with the key of its
     caller's own missed look-up is not looked up again;
  2. the rest: fetch + decode + hash (thread pool; MediaLoader applies the MediaPolicy; an image it decoded
     before is only hashed, and decoded in step 3 if it missed), then Lookup by hash;
  3. misses: HF processor (CPU) once per distinct key, then one Encode call with all processed tensors.
Only keys and metadata go back to the caller. The encoder owns the key layout (services/encoder/keyspaces.py),
so ingest needs neither Redis nor the model weights (the adapter is loaded on the meta device). Each step is
timed into mmpipe_ingest_step_duration_seconds{step} (fetch, decode, hash per item; load, lookup, preprocess,
encode per request; services/common/steps.py), and is a span when tracing.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import Counter as Tally
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mmpipe.services.common.convert import EmbeddingRef, LookupItem, MediaSource
from mmpipe.services.common.stage_clients import EncoderClient, ProcessedPayload
from mmpipe.services.common.uuids import UuidItem, apply_uuid_lookup
from mmpipe.services.common.warmup import warmup_items
from mmpipe.shared.cache.keys import canonical_json
from mmpipe.shared.errors import (
    InvalidInputError, LimitExceededError, MediaTimeoutError, OverloadedError,
)
from mmpipe.shared.inputs.media_settings import MediaSettings, SettingsSpace
from mmpipe.shared.media.budget import RequestBudget
from mmpipe.shared.media.decode_pool import DecodePool, DecodePoolConfig
from mmpipe.shared.media.loader import MediaLoader
from mmpipe.shared.media.policy import MediaPolicy
from mmpipe.shared.models.pixel_wire import float_wire_dtype, wire_tensors
from mmpipe.shared.types import MediaItem

log = logging.getLogger(__name__)


class IngestCore:
    def __init__(self, cfg, adapter, encoder: EncoderClient, metrics):
        self.cfg = cfg
        self.adapter = adapter
        self.encoder = encoder
        self.policy = MediaPolicy.from_env(
            allowed_media_domains=tuple(cfg.allowed_media_domains) if cfg.allowed_media_domains else None,
            allowed_local_media_path=cfg.allowed_local_media_path,
            **({"allow_private_networks": True} if cfg.allow_private_media_urls else {}), **cfg.media_limits())
        # the server's --mm-processor-kwargs / --media-io-kwargs; a request's own overlay them (checked there)
        self.decode_pool = None
        if cfg.decode_workers > 0:  # native decoders out of this process (shared/media/decode_pool.py)
            self.decode_pool = DecodePool(DecodePoolConfig(workers=cfg.decode_workers, timeout_s=cfg.decode_timeout_s,
                                                           cpu_seconds=cfg.decode_cpu_seconds,
                                                           memory_mb=cfg.decode_memory_mb))
        self.settings = SettingsSpace(adapter, cfg.model, media_io_kwargs=cfg.media_io_kwargs, policy=self.policy,
                                      pool=self.decode_pool, video_backend=cfg.video_backend)
        self.pool = ThreadPoolExecutor(cfg.num_workers, thread_name_prefix="ingest")
        self.pending = 0  # media items admitted and not finished (bounded by --max-pending-items)
        self.wire_dtype = float_wire_dtype(cfg.wire_dtype)  # the float fallback's; uint8 pixels stay uint8
        m, self.ml = metrics, metrics.model
        self.m_loaded = m.counter("media_loaded", "items fetched and decoded", ("modality",))
        self.m_pre = m.counter("items_preprocessed", "items run through the HF processor", ("modality",))
        self.m_lookup = m.counter("cache_lookups", "cache look-ups by result", ("result",))
        self.m_in = m.counter("media_received_bytes", "encoded media bytes received inline")
        self.m_out = m.counter("encoder_sent_bytes", "processed tensor bytes sent to the encoder")
        self.steps = m.steps()

    # ---- helpers ---------------------------------------------------------------------------------------
    def _settings(self, kw_json: str, mm_json: str) -> tuple[MediaSettings, str]:
        """A request's effective settings (InvalidInputError naming a bad key, before any work), and the canonical
        JSON of its media_io_kwargs for the encoder's keyspace."""
        s = self.settings.resolve(mm_json, kw_json)
        return s, canonical_json(s.media_io_kwargs)

    def _check(self, items: list[MediaSource]) -> None:
        for it in items:
            self.adapter.check_modality(it.modality)
            if it.source is None and not it.uuid:
                raise InvalidInputError(f"{it.modality} item has neither a source nor a uuid", param="items")
            if it.key and (not it.uuid or it.source is None):
                raise InvalidInputError(f"{it.modality} item has a key but no uuid or no source (a key is only for "
                                        f"a uuid that its caller looked up and missed)", param="items")
        limits = self.cfg.limit_mm_per_prompt or {}
        for modality, n in Tally(it.modality for it in items).items():
            if modality in limits and n > limits[modality]:
                raise LimitExceededError(f"at most {limits[modality]} {modality} item(s) per prompt "
                                         f"(--limit-mm-per-prompt), got {n}", param=modality)

    def _load(self, loader: MediaLoader, it: MediaSource, budget: RequestBudget, name: str) -> MediaItem:
        laps: list[tuple[str, float, float]] = []  # fetch, decode, hash
        item = loader.load(it.modality, it.source, target_sampling_rate=self.adapter.audio_sampling_rate,
                           uuid=it.uuid, timings=laps, budget=budget, name=name, defer_decode=True)
        for step, start, end in laps:
            self.steps.record(step, start, end)
        self.m_loaded.labels(self.ml, it.modality).inc()
        return item

    def _preprocess(self, item: MediaItem, settings: MediaSettings) -> bytes:
        from mmpipe.shared.cache.serde import pack_tensors

        p = self.adapter.preprocess(item.materialize(), settings.mm_processor_kwargs)
        self.m_pre.labels(self.ml, item.modality).inc()
        return pack_tensors(wire_tensors(p.tensors, self.wire_dtype), p.meta)

    async def _load_all(self, loader: MediaLoader, items: dict[int, MediaSource], budget: RequestBudget
                        ) -> list[MediaItem]:
        """Load `items` (by their index in the request, which names them in errors: "items[2]") concurrently."""
        loop = asyncio.get_running_loop()
        # in the caller's context: each item's spans are children of the "load" step, its logs carry the request id
        return await asyncio.gather(*[loop.run_in_executor(self.pool, contextvars.copy_context().run, self._load,
                                                           loader, it, budget, f"items[{i}]")
                                      for i, it in items.items()])

    async def _timed(self, step: str, coro):
        return await self.steps.timed(step, coro)

    # ---- the request -----------------------------------------------------------------------------------
    async def ingest(self, items: list[MediaSource], *, tenant: str = "", kw_json: str = "", mm_json: str = "",
                     request_id: str | None = None, timeout_s: float | None = None) -> list[EmbeddingRef]:
        """Admit the request (a bounded number of items in progress: beyond it RESOURCE_EXHAUSTED at once, so
        the worker pool's queue never grows without bound) and resolve it under one deadline: the caller's,
        capped by --encoder-timeout, applied to every encoder call."""
        n = max(1, len(items))
        limit = self.cfg.max_pending_items
        if self.pending and self.pending + n > limit:
            raise OverloadedError(f"ingest has {self.pending} media items in progress, its limit "
                                  f"(--max-pending-items {limit}); retry shortly")
        cap = self.cfg.encoder_timeout_s
        deadline = time.monotonic() + (min(timeout_s, cap) if timeout_s else cap)
        self.pending += n
        try:
            return await self._ingest(items, tenant=tenant, kw_json=kw_json, mm_json=mm_json,
                                      request_id=request_id, deadline=deadline)
        finally:
            self.pending -= n

    @staticmethod
    def _left(deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MediaTimeoutError("ingest ran out of time before calling the encoder (deadline exceeded)")
        return left

    async def _ingest(self, items: list[MediaSource], *, tenant: str, kw_json: str, mm_json: str,
                      request_id: str | None, deadline: float) -> list[EmbeddingRef]:
        settings, norm_kw = self._settings(kw_json, mm_json)
        self._check(items)
        loader = self.settings.loader(settings)
        self.m_in.labels(self.ml).inc(sum(len(it.data) for it in items if it.data is not None))
        loop = asyncio.get_running_loop()
        result: dict[int, EmbeddingRef] = {}
        keys: dict[int, str] = {}

        # 1. UUID items: no fetch when cached. One look-up per UUID: an item whose caller already looked it up
        #    and missed (the gateway) comes with the key that look-up named, and is not asked about again.
        for i, it in enumerate(items):
            if it.key:
                keys[i] = it.key
        uuid_idx = [i for i, it in enumerate(items) if it.uuid and not it.key]
        if uuid_idx:
            found = await self._timed("lookup", self.encoder.lookup(
                [LookupItem(modality=items[i].modality, uuid=items[i].uuid) for i in uuid_idx],
                request_id=request_id, tenant=tenant, media_io_kwargs=norm_kw, mm_processor_kwargs=mm_json,
                timeout_s=self._left(deadline)))
            self._count(found)
            outcomes = apply_uuid_lookup([UuidItem(items[i].modality, items[i].uuid or "", items[i].source is not None)
                                          for i in uuid_idx], found)
            for i, o in zip(uuid_idx, outcomes):
                if o.ref is not None:
                    result[i] = o.ref
                else:
                    keys[i] = o.key

        # 2. fetch + decode + hash the rest, then look the hashes up
        todo = [i for i in range(len(items)) if i not in result]
        loaded_list = await self._timed("load", self._load_all(loader, {i: items[i] for i in todo},
                                                               self.settings.budget(settings)))
        loaded = dict(zip(todo, loaded_list))
        hash_idx = [i for i in todo if i not in keys]
        if hash_idx:
            found = await self._timed("lookup", self.encoder.lookup(
                [LookupItem(modality=items[i].modality, content_hash=loaded[i].content_hash) for i in hash_idx],
                request_id=request_id, tenant=tenant, media_io_kwargs=norm_kw, mm_processor_kwargs=mm_json,
                timeout_s=self._left(deadline)))
            self._count(found)
            for i, (ok, ref) in zip(hash_idx, found):
                if ok:
                    result[i] = EmbeddingRef(**{**ref.__dict__, "content_hash": loaded[i].content_hash})
                else:
                    keys[i] = ref.key

        # 3. misses: preprocess each distinct key once, encode them all in one call
        misses = [i for i in todo if i not in result]
        if misses:
            first: dict[str, int] = {}
            for i in misses:
                first.setdefault(keys[i], i)
            payloads = await self._timed("preprocess", asyncio.gather(
                *[loop.run_in_executor(self.pool, self._preprocess, loaded[i], settings) for i in first.values()]))
            self.m_out.labels(self.ml).inc(sum(len(p) for p in payloads))
            refs = await self._timed("encode", self.encoder.encode(
                [ProcessedPayload(key=k, modality=items[i].modality, tensors=p,
                                  content_hash=loaded[i].content_hash, uuid=items[i].uuid or "")
                 for (k, i), p in zip(first.items(), payloads)], request_id=request_id,
                timeout_s=self._left(deadline)))
            by_key = {r.key: r for r in refs}
            for i in misses:
                r = by_key[keys[i]]
                result[i] = EmbeddingRef(**{**r.__dict__, "content_hash": loaded[i].content_hash,
                                            "uuid": items[i].uuid or ""})
        return [result[i] for i in range(len(items))]

    def _count(self, found: list[tuple[bool, Any]]) -> None:
        hits = sum(1 for ok, _ in found if ok)
        self.m_lookup.labels(self.ml, "hit").inc(hits)
        self.m_lookup.labels(self.ml, "miss").inc(len(found) - hits)

    def warmup(self) -> None:
        for item in warmup_items(self.adapter):
            self.adapter.preprocess(item)

    async def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.decode_pool is not None:
            self.decode_pool.close()
        await self.encoder.close()
