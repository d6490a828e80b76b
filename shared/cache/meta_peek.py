"""Read the metadata of cached embeddings from Redis without transferring their tensors.

A cached value is a `serde` payload: 40-byte prefix, JSON header (modality, meta, tensor shapes), then the
tensor bytes. `peek_headers` fetches only the first few KB of each value (GETRANGE, pipelined: one round
trip for all keys) and parses and checksums the header, so a look-up of a 9 MB embedding moves ~1 KB.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import blake3

from .serde import _PREFIX, FORMAT_VERSION, MAGIC, CacheCorruptError

__all__ = ["parse_header", "peek_headers"]

_PEEK = 4096


def parse_header(buf: bytes) -> dict[str, Any] | int:
    """The header dict of a payload prefix, or the number of bytes needed when `buf` is too short."""
    if len(buf) < _PREFIX.size:
        raise CacheCorruptError(f"corrupt mmpipe payload: {len(buf)} bytes is shorter than the prefix")
    magic, hlen, digest = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CacheCorruptError(f"corrupt mmpipe payload: bad magic {bytes(magic)!r}")
    need = _PREFIX.size + hlen
    if len(buf) < need:
        return need
    hbytes = buf[_PREFIX.size:need]
    if blake3.blake3(hbytes).digest() != digest:
        raise CacheCorruptError("corrupt mmpipe payload: header checksum mismatch")
    header = json.loads(hbytes)
    if not isinstance(header, dict) or header.get("v") != FORMAT_VERSION:
        raise CacheCorruptError("corrupt mmpipe payload: unsupported format version")
    return header


def peek_headers(client: Any, keys: Sequence[str]) -> list[dict[str, Any] | None]:
    """One header per key (None for a missing or corrupt entry), via a redis-py client (sync)."""
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.getrange(k, 0, _PEEK - 1)
    raw = pipe.execute()
    out: list[dict[str, Any] | None] = []
    for k, b in zip(keys, raw):
        if not b:
            out.append(None)
            continue
        try:
            h = parse_header(b)
            if isinstance(h, int):  # a header longer than _PEEK bytes: one more read
                h = parse_header(client.getrange(k, 0, h - 1))
            out.append(h if isinstance(h, dict) else None)
        except (CacheCorruptError, ValueError):
            out.append(None)
    return out
