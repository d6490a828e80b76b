"""Turn a batch of prompts' ItemRefs into embeddings: cache look-ups first, then load, preprocess, encode.

Order of work, so that cached media costs nothing:
  1. items with a UUID: look the UUID key up (no fetch, no decode); a UUID-only item that misses is an error;
  2. other items: load (fetch + decode + hash; an image the loader decoded before is not decoded again until
     step 3 needs its pixels), then look the content-hash key up;
  3. misses: preprocess and encode in one batch per modality across the whole request batch (identical
     items inside the batch are encoded once), then write to the cache.
The same steps run in separate processes in the services (gateway: 1, ingest: 2, encoder: 3).
A cache that fails is a cache (shared/cache/best_effort.py): a read it cannot answer is a miss, re-encoded, and a
write it cannot take is skipped; only a UUID-only item, whose embedding exists nowhere else, then fails, with a
retryable ServiceUnavailableError.
Each prompt may carry its own MediaSettings (shared/inputs/media_settings.py): its items are loaded, looked up,
preprocessed and stored under those settings' loader and keyspace, so one image at two sizes is two entries.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Any

from mmpipe.shared.cache.best_effort import read_or_miss, write_or_skip
from mmpipe.shared.errors import NotCachedError, ServiceUnavailableError
from mmpipe.shared.inputs.media_settings import MediaSettings, SettingsSpace
from mmpipe.shared.inputs.parse import ItemRef
from mmpipe.shared.models.base import ModelAdapter
from mmpipe.shared.types import MediaItem, MMEmbedding


@dataclass
class ResolveStats:
    """Counters an operator (and the tests) read to see which work ran."""

    media_loaded: int = 0
    items_preprocessed: int = 0
    items_encoded: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


class EmbeddingResolver:
    def __init__(self, adapter: ModelAdapter, space: SettingsSpace, cache: Any | None):
        self.adapter = adapter
        self.space = space
        self.cache = cache
        self.stats = ResolveStats()

    @property
    def loader(self) -> Any:
        """The loader of the server's default settings."""
        return self.space.loader(self.space.default)

    @property
    def keyspace(self) -> Any:
        """The cache keyspace of the server's default settings."""
        return self.space.keyspace()

    def load(self, ref: ItemRef, settings: MediaSettings | None = None, budget: Any = None, *,
             defer_decode: bool = False) -> MediaItem:
        """`budget`: the prompt's decode budget (SettingsSpace.budget); None: a fresh one for this item alone.
        `defer_decode`: MediaLoader.load's (an image decoded before comes back undecoded: `materialize()`)."""
        s = settings or self.space.default
        loader = self.space.loader(s)
        item = loader.load(ref.modality, ref.source, target_sampling_rate=self.adapter.audio_sampling_rate,
                           budget=budget if budget is not None else self.space.budget(s), defer_decode=defer_decode)
        self.stats.add(media_loaded=1)
        return item

    def resolve(self, batch: list[list[ItemRef]], *, tenant: str | None = None,
                settings: list[MediaSettings] | None = None) -> list[list[MMEmbedding]]:
        return [[emb for emb, _ in items] for items in self.resolve_keyed(batch, tenant=tenant, settings=settings)]

    def resolve_keyed(self, batch: list[list[ItemRef]], *, tenant: str | None = None,
                      settings: list[MediaSettings] | None = None) -> list[list[tuple[MMEmbedding, str | None]]]:
        """`resolve`, with each embedding's identity: the cache key it was read or stored under (with the
        cache off, the content-hash key it would have), or None for precomputed embeddings without a UUID.
        The engine's prefix cache shares KV blocks under these keys. `settings`: one per prompt (default: the
        server's)."""
        per = settings or [self.space.default] * len(batch)
        spaces = [self.space.keyspace(s) for s in per]
        flat = [(p, i, ref) for p, refs in enumerate(batch) for i, ref in enumerate(refs)]
        result: dict[tuple[int, int], MMEmbedding] = {}
        keys: dict[tuple[int, int], str] = {}
        use_cache = self.cache is not None

        def key_for(p: int, modality: str, **kw: Any) -> str:
            return spaces[p].key(modality, **kw)

        # 1. precomputed embeddings and UUID look-ups
        uuid_lookups = []
        for p, i, ref in flat:
            if ref.is_embeds and ref.source is not None:
                result[(p, i)] = ref.source
                if use_cache and ref.uuid is not None:
                    write_or_skip(self.cache, [(key_for(p, ref.modality, uuid=ref.uuid, tenant=tenant), ref.source)])
            elif use_cache and ref.uuid is not None:
                keys[(p, i)] = key_for(p, ref.modality, uuid=ref.uuid, tenant=tenant)
                uuid_lookups.append((p, i, ref))
        unreachable = self._lookup(uuid_lookups, keys, result)
        for p, i, ref in uuid_lookups:
            if (p, i) in unreachable and ref.source is None:
                raise ServiceUnavailableError(f"{ref.modality} item with uuid {ref.uuid!r}: the embedding cache is "
                                              f"unreachable, and a uuid-only item exists only there; retry shortly")
            if (p, i) not in result and ref.source is None:
                raise NotCachedError(f"{ref.modality} item with uuid {ref.uuid!r} is not in the embedding cache; "
                                     f"send the media together with the uuid once", param=ref.uuid)

        # 2. load the rest, then look their content hashes up
        loaded: dict[tuple[int, int], MediaItem] = {}
        hash_lookups = []
        budgets: dict[int, Any] = {}  # one decode budget per prompt (a request of the offline API)
        for p, i, ref in flat:
            if (p, i) in result:
                continue
            if p not in budgets:
                budgets[p] = self.space.budget(per[p])
            item = self.load(ref, per[p], budgets[p], defer_decode=True)
            loaded[(p, i)] = item
            if ref.uuid is None:
                keys[(p, i)] = key_for(p, ref.modality, content_hash=item.content_hash) if use_cache else ""
                hash_lookups.append((p, i, ref))
        if use_cache:
            self._lookup(hash_lookups, keys, result)

        # 3. encode the misses, one batch per modality, identical items once
        by_mod: dict[str, dict[str, list[tuple[int, int]]]] = defaultdict(dict)
        for pi, item in loaded.items():
            if pi in result:
                continue
            # without a cache key, the same content under other settings is another item
            dedup = keys.get(pi) or f"{per[pi[0]].id}:{item.content_hash}"
            by_mod[item.modality].setdefault(dedup, []).append(pi)
        for modality, groups in by_mod.items():
            processed = [self.adapter.preprocess(loaded[g[0]].materialize(), per[g[0][0]].mm_processor_kwargs)
                         for g in groups.values()]
            self.stats.add(items_preprocessed=len(processed))
            embs = self.adapter.encode(modality, processed)
            self.stats.add(items_encoded=len(embs))
            for (dedup, members), emb in zip(groups.items(), embs):
                if use_cache:
                    write_or_skip(self.cache, [(keys[members[0]], emb)])
                for pi in members:
                    result[pi] = emb

        def identity(pi: tuple[int, int]) -> str | None:
            if keys.get(pi):
                return keys[pi]
            item = loaded.get(pi)
            if item is None:
                return None
            return key_for(pi[0], item.modality, content_hash=item.content_hash)

        return [[(result[(p, i)], identity((p, i))) for i in range(len(refs))] for p, refs in enumerate(batch)]

    def _lookup(self, todo: list[tuple[int, int, ItemRef]], keys: dict, result: dict) -> set[tuple[int, int]]:
        """Hits into `result`; returns the items the cache could not be asked about (read as misses)."""
        if not todo or self.cache is None:
            return set()
        got, failed = read_or_miss(self.cache, [keys[(p, i)] for p, i, _ in todo])
        hits = 0
        for (p, i, ref), emb in zip(todo, got):
            if emb is not None and emb.modality == ref.modality:
                result[(p, i)] = emb
                hits += 1
        self.stats.add(cache_hits=hits, cache_misses=len(todo) - hits)
        return {todo[j][:2] for j in failed}
