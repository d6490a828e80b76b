"""In-process LRU embedding cache bounded by tensor bytes.

Keeps MMEmbedding objects as they are (no serialisation, no copy), so a hit costs a dict lookup. The
bound counts the bytes each entry keeps alive, which is why views into a larger buffer are cloned on put.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable, Sequence

from ..errors import InvalidInputError
from ..types import MMEmbedding
from .base import CacheStats, EmbeddingCache, _Counters

__all__ = ["LRUEmbeddingCache", "embedding_nbytes"]

GiB = 1 << 30
_MAX_VIEW_WASTE = 64 * 1024


def embedding_nbytes(emb: MMEmbedding) -> int:
    """Bytes of the tensor's own elements."""
    t = emb.tensor
    return int(t.numel()) * int(t.element_size())


class LRUEmbeddingCache(EmbeddingCache):
    """Thread-safe LRU keyed by string, evicting least recently used entries beyond `max_bytes`.

    Tensors stay on the device they were put on (a CUDA tensor here holds GPU memory). An entry larger
    than `max_bytes` is not stored.
    """

    def __init__(self, max_bytes: int = 2 * GiB):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise InvalidInputError(f"max_bytes must be a non-negative int, got {max_bytes!r}",
                                    param="max_bytes")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._data: OrderedDict[str, tuple[MMEmbedding, int]] = OrderedDict()
        self._bytes = 0
        self._evictions = 0
        self._c = _Counters()

    def __len__(self) -> int:
        return len(self._data)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def get_many(self, keys: Sequence[str]) -> list[MMEmbedding | None]:
        out: list[MMEmbedding | None] = []
        hits = misses = nread = 0
        with self._lock:
            for k in keys:
                ent = self._data.get(k)
                if ent is None:
                    misses += 1
                    out.append(None)
                    continue
                self._data.move_to_end(k)
                emb, n = ent
                hits += 1
                nread += n
                # A fresh MMEmbedding with a copied meta dict, so a caller adding keys to meta can't
                # change what the next reader sees; the tensor itself is shared (read-only by contract).
                out.append(MMEmbedding(emb.modality, emb.tensor, dict(emb.meta)))
        self._c.add(hits=hits, misses=misses, bytes_read=nread)
        return out

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [k in self._data for k in keys]

    def put_many(self, items: Iterable[tuple[str, MMEmbedding]]) -> None:
        prepared = []
        for key, emb in items:
            t = emb.tensor.detach()
            n = int(t.numel()) * int(t.element_size())
            held = int(t.untyped_storage().nbytes())
            # A per-item slice of a batch output keeps the whole batch buffer alive; cloning makes the
            # byte bound true at the cost of one copy of this item. A view with little waste around it
            # is kept as is and charged for its whole storage.
            if held - n > _MAX_VIEW_WASTE:
                t, held = t.clone(), n
            prepared.append((key, MMEmbedding(emb.modality, t, dict(emb.meta)), max(n, held)))
        puts = written = 0
        with self._lock:
            for key, emb, n in prepared:
                old = self._data.pop(key, None)
                if old is not None:
                    self._bytes -= old[1]
                if n > self.max_bytes:
                    continue
                self._data[key] = (emb, n)
                self._bytes += n
                puts += 1
                written += n
                while self._bytes > self.max_bytes:
                    _, (_, en) = self._data.popitem(last=False)
                    self._bytes -= en
                    self._evictions += 1
        self._c.add(puts=puts, bytes_written=written)

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            entries, used, ev = len(self._data), self._bytes, self._evictions
        return self._c.snapshot(entries=entries, evictions=ev, bytes_used=used, max_bytes=self.max_bytes)

    def close(self) -> None:
        self.clear()
