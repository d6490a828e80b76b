"""The encoder is the one owner of the cache key layout: it builds every key from its own loaded model.

Keys are built exactly as the offline `LLM` builds them, by shared/inputs/media_settings.py (`SettingsSpace`),
so offline runs and the services share cache entries: the keyspace digests the request's EFFECTIVE settings
(the server's --mm-processor-kwargs / --media-io-kwargs overlaid with the request's own, checked against the
family's allow-list and ceilings), and the model fingerprint includes the config and dtype, so only an encoder
with the same model, dtype and settings can read or write the same entries. Ingest never computes keys: it asks
the encoder (Lookup).
How the processed pixels reached the encoder (uint8 finished on the device, or float) is not in the key: the
tower input is the same either way (shared/models/pixel_wire.py), and `settings()` already holds every
processor setting the finishing step reads (rescale factor, mean, std, patch sizes).
"""
from __future__ import annotations

from mmpipe.shared.cache.keys import CacheKeyspace
from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.inputs.media_settings import SettingsSpace


class Keyspaces:
    def __init__(self, model: str, adapter, default_media_io_kwargs: dict | None):
        self.space = SettingsSpace(adapter, model, media_io_kwargs=default_media_io_kwargs)
        self.model_fp = self.space.model_fp
        self.prefix = f"mmpipe:v1:{self.model_fp}:"

    def get(self, media_io_kwargs_json: str = "", mm_processor_kwargs_json: str = "") -> CacheKeyspace:
        """The keyspace of a request's settings (JSON objects; empty = the server's). InvalidInputError names
        a bad key."""
        return self.space.keyspace(self.space.resolve(mm_processor_kwargs_json, media_io_kwargs_json))

    def check_key(self, key: str) -> None:
        """Refuse keys outside this model's part of the keyspace (no writes over other deployments' data)."""
        if not key.startswith(self.prefix):
            raise InvalidInputError("embedding key does not belong to this model's cache keyspace", param="key")
