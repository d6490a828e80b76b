"""Prefix-cache keys of KV blocks: a chained hash of everything a full block's K/V depend on.

    key(block i) = H(key(block i-1), token ids of block i, [M-RoPE positions of block i], media in block i)
    key(block -1) = root_key(namespace, block_size, mrope)

K/V at a position are a function of the tokens and embedding rows at and before it and of the positions, so
two blocks with the same key hold the same K/V: the chain covers everything before the block, the block's
own inputs cover the rest. Media rows enter through their item's key (the embedding cache key: a content
hash or a tenant-scoped UUID, with the model fingerprint and the processor-settings digest in it, so
`mm_processor_kwargs` and the tenant are part of it) plus where the item sits relative to the block, which
fixes which of its rows land where. M-RoPE positions are hashed as they are (they follow from the same
inputs, the items' grids included, but hashing them makes that a fact instead of an argument, and it keeps
generated tokens, whose positions continue from the prompt's last one, apart from prompt tokens whose
positions would differ).

Pure Python (hashlib, struct): no torch, so a router can compute the same keys. Digests are 32-byte
BLAKE2b, so a collision (two different blocks with one key) is not a practical concern and tokens are not
compared on a hit.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Iterable, Sequence

KEY_BYTES = 32
_LAYOUT = b"mmpipe-kv-block:v1"
_MEDIA = struct.Struct("<iiI")  # item start relative to the block, item length, key length


def root_key(namespace: str, block_size: int, mrope: bool) -> bytes:
    """The parent of a sequence's first block: separates models/settings, block sizes and position kinds."""
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    h.update(_LAYOUT)
    h.update(struct.pack("<IB", block_size, 1 if mrope else 0))
    h.update(namespace.encode("utf-8"))
    return h.digest()


def block_key(parent: bytes, token_ids: Sequence[int], positions: bytes = b"",
              media: Iterable[tuple[str, int, int]] = ()) -> bytes:
    """Key of one full block.

    parent: the previous block's key (or the root). token_ids: the block's `block_size` ids. positions: the
    block's M-RoPE positions as little-endian int32 (3, block_size), empty for 1-D RoPE (there the position is
    the index, fixed by the chain). media: (item key, item start - block start, item length) of each item
    with rows in the block. Every part is fixed-length or length-prefixed, so distinct inputs never
    serialise alike.
    """
    return chain_key(parent, token_bytes(token_ids), positions, media_bytes(media))


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as a block key holds them: little-endian int32, in one C call (struct.error when an id is not
    an integer or outside int32)."""
    return struct.pack(f"<{len(token_ids)}i", *token_ids)


def chain_key(parent: bytes, token_bytes: bytes, positions: bytes = b"", media: bytes = b"") -> bytes:
    """`block_key` of inputs already serialised: the ids as little-endian int32, the positions, `media_bytes`.
    One digest call over their concatenation (the same digest as feeding them one by one): the engine slices a
    whole prompt's serialised ids and positions once instead of packing every block."""
    return hashlib.blake2b(parent + token_bytes + positions + media, digest_size=KEY_BYTES).digest()


def chain_keys(parent: bytes, records: bytes, width: int, first: int, end: int,
               media: dict[int, bytes]) -> list[bytes]:
    """`chain_key` of blocks first..end-1 after `parent`, each block's ids and positions serialised one after the
    other in `records` (`width` bytes a block: the ids, then the positions); `media[i]`: block i's `media_bytes`
    (absent: none). The same keys as calling `chain_key` block by block, in one loop."""
    out: list[bytes] = []
    fresh, rec, get, append = hashlib.blake2b(digest_size=KEY_BYTES), memoryview(records), media.get, out.append
    for i in range(first, end):  # copies of one fresh state: no constructor argument parsing per block
        h = fresh.copy()
        h.update(parent)
        h.update(rec[i * width:(i + 1) * width])
        h.update(get(i, b""))
        parent = h.digest()
        append(parent)
    return out


def media_bytes(media: Iterable[tuple[str, int, int]]) -> bytes:
    """The media part of a block key: per item (item start - block start, length, key length) and the key."""
    out = b""
    for key, rel_start, length in media:
        kb = key.encode("utf-8")
        out += _MEDIA.pack(rel_start, length, len(kb)) + kb
    return out


def block_media(spans: Iterable[tuple[int, int, str]], start: int, end: int) -> list[tuple[str, int, int]]:
    """The `media` argument of `block_key` for the block of tokens [start, end): (key, item start - start,
    length) of every item (offset, length, key) with rows in it."""
    return [(key, off - start, n) for off, n, key in spans if off < end and off + n > start]


def prefix_keys(root: bytes, token_ids: Sequence[int], spans: Iterable[tuple[int, int, str | None]],
                block_size: int, max_blocks: int | None = None) -> list[bytes]:
    """Chained keys of the first full blocks of an expanded prompt without M-RoPE positions (1-D RoPE keys; the
    gateway's router keys M-RoPE prompts the same way, since their positions follow from these inputs).

    spans: (offset, length, key) per media item; an item with no key (None) ends the keyed prefix at its first
    row, as in the engine. At most `max_blocks` keys.
    """
    spans = sorted(spans)
    limit = min([off for off, _, key in spans if key is None], default=len(token_ids))
    named = [(off, n, key) for off, n, key in spans if key is not None]
    n = limit // block_size if max_blocks is None else min(limit // block_size, max_blocks)
    keys: list[bytes] = []
    parent = root
    for i in range(n):
        a, b = i * block_size, (i + 1) * block_size
        parent = block_key(parent, token_ids[a:b], b"", block_media(named, a, b))
        keys.append(parent)
    return keys
