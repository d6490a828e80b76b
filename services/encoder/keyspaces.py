"""The encoder is the one owner of the cache key layout: it builds every key from its own loaded model.

Keys are built exactly as the offline `LLM` builds them (mmpipe/llm.py), so offline runs and the services
share cache entries:
    CacheKeyspace(model_fingerprint(model, config.to_dict()),
                  settings_digest({"adapter": adapter.settings(), "media_io_kwargs": media_io_kwargs or {}}))
The config dict includes the dtype, so only an encoder with the same model, dtype and processor settings
can read or write the same entries. Ingest never computes keys: it asks the encoder (Lookup).
How the processed pixels reached the encoder (uint8 finished on the device, or float) is not in the key: the
tower input is the same either way (shared/models/pixel_wire.py), and `settings()` already holds every
processor setting the finishing step reads (rescale factor, mean, std, patch sizes).
"""
from __future__ import annotations

import json
import threading

from mmpipe.shared.cache.keys import CacheKeyspace, canonical_json, model_fingerprint, settings_digest
from mmpipe.shared.errors import InvalidInputError


class Keyspaces:
    def __init__(self, model: str, adapter, default_media_io_kwargs: dict | None):
        self.model_fp = model_fingerprint(model, adapter.model.config.to_dict())
        self.settings = adapter.settings()
        self.default = default_media_io_kwargs or {}
        self.prefix = f"mmpipe:v1:{self.model_fp}:"
        self._by_kw: dict[str, CacheKeyspace] = {}
        self._lock = threading.Lock()

    def get(self, media_io_kwargs_json: str = "") -> CacheKeyspace:
        """The keyspace for a request's media_io_kwargs (JSON; empty = the server default)."""
        if media_io_kwargs_json:
            try:
                kw = json.loads(media_io_kwargs_json)
            except ValueError:
                raise InvalidInputError("media_io_kwargs is not valid JSON", param="media_io_kwargs") from None
            if not isinstance(kw, dict):
                raise InvalidInputError("media_io_kwargs must be a JSON object", param="media_io_kwargs")
        else:
            kw = self.default
        norm = canonical_json(kw)
        with self._lock:
            ks = self._by_kw.get(norm)
            if ks is None:
                ks = CacheKeyspace(self.model_fp, settings_digest({"adapter": self.settings, "media_io_kwargs": kw}))
                if len(self._by_kw) < 1024:
                    self._by_kw[norm] = ks
            return ks

    def check_key(self, key: str) -> None:
        """Refuse keys outside this model's part of the keyspace (no writes over other deployments' data)."""
        if not key.startswith(self.prefix):
            raise InvalidInputError("embedding key does not belong to this model's cache keyspace", param="key")
