"""A request's effective media settings, and what depends on them: the cache keyspace and the media loader.

    MediaSettings    the server's --mm-processor-kwargs / --media-io-kwargs overlaid with a request's own, checked
                     once (the family's allow-list and ceilings: shared/models/mm_kwargs.py; the media IO options:
                     shared/media/loader.py). Frozen: from the edge that resolved it to the processor call.
    resolve_settings the one check of a request's settings (adapter class + processor, no weights: the gateway too).
    SettingsSpace    one server's defaults; `resolve` turns a request's raw kwargs into MediaSettings, `keyspace`
                     and `loader` give the cache keyspace and the loader of those settings (memoised), `budget`
                     a fresh decode budget for one request under them (shared/media/budget.py).

The keyspace digest is `settings_digest({"adapter": adapter.settings(mm), "media_io_kwargs": io})` over the
EFFECTIVE settings, so the same image at two sizes never shares an entry, while a request that sets nothing (or
only the server's own values) shares the entries of every other such request, offline and served alike (the
offline `LLM`, ingest and the encoder all build keyspaces here).

Must not: fetch media, call the processor, or know about gRPC / HTTP.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmpipe.shared.cache.keys import CacheKeyspace, canonical_json, model_fingerprint, settings_digest
from mmpipe.shared.models.mm_kwargs import parse_kwargs_json

_MEMO = 1024  # distinct settings remembered per server (more still work, only unmemoised)


@dataclass(frozen=True)
class MediaSettings:
    """Effective, validated settings of one request. `id` is equal exactly when the settings are."""

    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    media_io_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return canonical_json({"mm": self.mm_processor_kwargs, "io": self.media_io_kwargs})


def merge_media_io_kwargs(server: Mapping[str, Any], request: Mapping[str, Any]) -> dict[str, Any]:
    """Per modality, the request's options over the server's (a non-object is kept for the loader to refuse)."""
    out = {m: dict(v) if isinstance(v, Mapping) else v for m, v in server.items()}
    for m, v in request.items():
        base = out.get(m)
        out[m] = {**base, **v} if isinstance(base, dict) and isinstance(v, Mapping) else v
    return out


def resolve_settings(adapter_cls: Any, processor: Any, server_mm: Mapping[str, Any], server_io: Mapping[str, Any],
                     request_mm: Mapping[str, Any] | str | None, request_io: Mapping[str, Any] | str | None,
                     policy: Any = None) -> tuple[MediaSettings, dict[str, Any]]:
    """The one check of a request's settings: (its effective MediaSettings, its own validated mm_processor_kwargs).
    Needs the family's adapter class and the processor only (no weights), so the gateway applies it at the edge
    and each stage again at its own. InvalidInputError names the offending key."""
    from mmpipe.shared.media.loader import MediaLoader

    own_mm = parse_kwargs_json(request_mm, "mm_processor_kwargs")
    mm = adapter_cls.resolve_request_mm_kwargs(processor, dict(server_mm), own_mm)
    req_io = parse_kwargs_json(request_io, "media_io_kwargs")
    io = merge_media_io_kwargs(server_io, req_io) if req_io else dict(server_io)
    if req_io:
        MediaLoader(policy, io)  # validates the media IO options (InvalidInputError naming the key)
    return MediaSettings(mm, io), own_mm


class SettingsSpace:
    """The settings of one served model: defaults, per-request resolution, keyspaces and loaders."""

    def __init__(self, adapter: Any, model: str, *, media_io_kwargs: Mapping[str, Any] | str | None = None,
                 policy: Any = None, model_fp: str | None = None, pool: Any = None, video_backend: str | None = None):
        """pool: a shared/media/decode_pool.DecodePool every loader decodes in (None: in this process);
        video_backend: every loader's video decoder (shared/media/video_readers.py; None: the default, PyAV).
        Not part of the keyspace: the content hash is taken over the decoded frames, so a cache entry always
        belongs to the pixels it was computed from, whichever decoder produced them."""
        from mmpipe.shared.media.loader import MediaLoader

        self.adapter = adapter
        self.policy = policy
        self.pool = pool
        self.video_backend = video_backend
        self.model_fp = model_fp or model_fingerprint(model, adapter.model.config.to_dict())
        self.default_io = parse_kwargs_json(media_io_kwargs, "media_io_kwargs")
        self.default = MediaSettings(dict(adapter.mm_processor_kwargs), self.default_io)
        default_loader = MediaLoader(policy, self.default_io, pool, video_backend)
        self._loaders: dict[str, Any] = {canonical_json(self.default_io): default_loader}
        self._keyspaces: dict[str, CacheKeyspace] = {}
        self._lock = threading.Lock()

    def resolve(self, mm_processor_kwargs: Mapping[str, Any] | str | None = None,
                media_io_kwargs: Mapping[str, Any] | str | None = None) -> MediaSettings:
        """A request's raw kwargs (objects, or JSON text from the wire; None/empty: none) -> its MediaSettings.
        InvalidInputError names the offending key."""
        s, _ = resolve_settings(type(self.adapter), self.adapter.processor, self.adapter.mm_processor_kwargs,
                                self.default_io, mm_processor_kwargs, media_io_kwargs, self.policy)
        return s

    def loader(self, s: MediaSettings) -> Any:
        from mmpipe.shared.media.loader import MediaLoader

        key = canonical_json(s.media_io_kwargs)
        loader = self._loaders.get(key)
        if loader is None:
            loader = MediaLoader(self.policy, s.media_io_kwargs, self.pool, self.video_backend)
            with self._lock:
                if len(self._loaders) < _MEMO:
                    self._loaders[key] = loader
        return loader

    def budget(self, s: MediaSettings | None = None) -> Any:
        """A fresh RequestBudget for one request: the policy's ceilings, its per-image decode limit derived from the
        largest image the processor keeps under these settings (the request's max_pixels, else the server's)."""
        from mmpipe.shared.media.policy import MediaPolicy

        s = s or self.default
        policy = self.policy
        if policy is None:  # as MediaLoader does: the operator's environment
            policy = self.policy = MediaPolicy.from_env()
        ceilings = type(self.adapter).mm_kwargs_ceilings(self.adapter.processor, dict(self.adapter.mm_processor_kwargs))
        kept = s.mm_processor_kwargs.get("max_pixels", ceilings.get("max_pixels"))
        return policy.budget(int(kept) if isinstance(kept, (int, float)) and not isinstance(kept, bool) else None)

    def keyspace(self, s: MediaSettings | None = None) -> CacheKeyspace:
        s = s or self.default
        key = s.id
        ks = self._keyspaces.get(key)
        if ks is None:
            ks = CacheKeyspace(self.model_fp, settings_digest({"adapter": self.adapter.settings(s.mm_processor_kwargs),
                                                              "media_io_kwargs": s.media_io_kwargs}))
            with self._lock:
                if len(self._keyspaces) < _MEMO:
                    self._keyspaces[key] = ks
        return ks
