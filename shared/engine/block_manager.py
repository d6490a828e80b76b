"""BlockManager: hands out fixed-size KV blocks, ref-counted, with automatic prefix caching.

Prefix caching (vLLM's automatic prefix caching, nano-vllm's shape): every full block of a sequence has a key
(block_hash.py: chained over the tokens, M-RoPE positions and media item keys). Once a block's K/V are
scheduled to be written, its key is registered; a sequence admitted later whose prompt starts with the same
keys takes those blocks (reference count + 1) instead of computing them, and its prefill starts after them.
A block whose last user is gone keeps its key and goes to the free queue's evictable end; it is reused as it
is by a later hit, or evicted (key dropped) only when a new block is needed and no key-less block is free.

Free queue order: key-less blocks first (so no cached block is evicted while one of them is left), then
cached blocks from least to most recently freed; a sequence's blocks are freed last-first, so its tail is
evicted before its head.

Sliding windows (window.py), for models whose every layer is windowed (`window`: the largest one): a
sequence gives back the blocks behind the window of its next query (`release_behind_window`, called by the
scheduler before each chunk or decode is scheduled, so a freed block may serve another sequence in the same
step: this one no longer reads it). Their table entries become `FREED_BLOCK`; a freed block goes to the free
queue like any other (one reference less: a block shared through the prefix cache stays with its other
users; a keyed block keeps its key and is evicted only when needed, so it can still be a hit). A sequence
is then admitted with blocks for its first chunk only (later chunks and decodes get theirs as they are
scheduled), and a prefix-cache hit needs only the blocks its first computed token can see: the longest
cached prefix is the longest one whose blocks from `first_visible_block` on are all cached (the blocks
before it may have been evicted; their entries are `FREED_BLOCK` from the start). `commit` registers only
blocks the sequence holds, so a key never names a freed entry.
"""
from __future__ import annotations

from collections import OrderedDict

from .block_hash import root_key
from .sequence import Sequence
from .window import FREED_BLOCK, cdiv, first_visible_block

__all__ = ["BlockManager", "cdiv"]


class BlockManager:
    """Allocator of KV cache blocks; a sequence's `block_table` lists its blocks in token order.

    Blocks are registered in the cache when the step that writes them is scheduled, not after it ran: every
    layer writes the whole step's K/V before any attention of that layer reads the cache, so a sequence
    admitted in the same step (or later) may already read them. A block still to be computed by a chunk of
    a later step is not registered, so a request arriving mid-prefill shares what has been scheduled so far
    and computes the rest itself (its copy is then not registered: the first copy stays the cached one).
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = False,
                 namespace: str = "", mrope: bool = False, window: int | None = None):
        """`window`: give back blocks behind this many keys (`DecoderSpec.kv_free_window`), or None (keep all)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.window = window
        self.enable_prefix_caching = enable_prefix_caching
        self.mrope = mrope
        self.root = root_key(namespace, block_size, mrope)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._keys: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        # cumulative counters (engine.stats): prompt tokens looked up / found at first admission, evictions
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.num_evicted_blocks = 0
        self.num_window_freed_blocks = 0  # blocks given back mid-sequence, behind every layer's window

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones among them: they are evicted when needed)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a registered key, in use or not."""
        return len(self._cached)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """More blocks `seq` needs so that its first `num_tokens` tokens have slots."""
        return max(0, cdiv(num_tokens, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` new blocks until its first `num_tokens` tokens have slots."""
        n = self.blocks_needed(seq, num_tokens)
        if n > len(self._free):
            raise RuntimeError("out of KV blocks (the scheduler should have checked)")
        seq.block_table.extend(self._take() for _ in range(n))

    def num_slots(self, seq: Sequence) -> int:
        """Tokens of `seq` that have a slot (or had one, behind the window): [0, num_slots)."""
        return len(seq.block_table) * self.block_size

    def room_end(self, seq: Sequence) -> int:
        """The end of the longest token range [0, end) of `seq` that could have slots with the free blocks now."""
        return (len(seq.block_table) + len(self._free)) * self.block_size

    def allocate_prompt(self, seq: Sequence, max_chunk: int | None = None) -> bool:
        """Admit `seq`: take its longest cached prefix and new blocks for the rest of its tokens, and set
        `num_computed_tokens` to the cached part. False (nothing changed) when the free blocks do not suffice.
        With a `window`, new blocks only for its first chunk (at most `max_chunk` tokens, fewer when the free
        blocks hold fewer; False when they hold none)."""
        skip, hits = self._cached_prefix(seq)
        start = (skip + len(hits)) * self.block_size
        reviving = sum(1 for b in hits if self._refs[b] == 0)  # cached blocks that sit in the free queue
        avail = len(self._free) - reviving
        if self.window is None:
            need = cdiv(seq.num_tokens, self.block_size) - len(hits)
        else:
            end = seq.num_tokens if max_chunk is None else min(seq.num_tokens, start + max_chunk)
            need = min(cdiv(end, self.block_size) - skip - len(hits), avail)
            if need <= 0:
                return False
        if need > avail:
            return False
        for b in hits:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1
        seq.block_table = [FREED_BLOCK] * skip + hits + [self._take() for _ in range(need)]
        seq.num_freed_blocks = skip
        seq.num_computed_tokens = start
        seq.num_committed_blocks = skip + len(hits)
        if not seq.admitted:  # preemption recomputes are not prompt queries
            seq.admitted = True
            seq.num_cached_tokens = seq.num_computed_tokens
            if self.enable_prefix_caching:
                self.num_queried_tokens += seq.num_prompt_tokens
                self.num_hit_tokens += seq.num_cached_tokens
        return True

    def commit(self, seq: Sequence, end: int) -> None:
        """Register the full blocks of tokens [0, end) of `seq` (scheduled to be computed in this step)."""
        n = min(end, seq.hash_limit) // self.block_size
        if n <= seq.num_committed_blocks or not self.enable_prefix_caching:
            return
        keys = self._block_keys(seq, n)
        table, cached = seq.block_table, self._cached
        for i in range(seq.num_committed_blocks, n):
            k, b = keys[i], table[i]
            if b != FREED_BLOCK and k not in cached and self._keys[b] is None:
                cached[k] = b
                self._keys[b] = k
        seq.num_committed_blocks = n

    def free(self, seq: Sequence) -> None:
        self._release_many(reversed(seq.block_table[seq.num_freed_blocks:]))
        seq.block_table = []
        seq.num_committed_blocks = 0
        seq.num_freed_blocks = 0

    def release_behind_window(self, seq: Sequence, start: int) -> int:
        """Give back the blocks of `seq` that no query at or after position `start` can see (with a `window`;
        none without). Returns how many."""
        if self.window is None:
            return 0
        end = min(first_visible_block(start, self.window, self.block_size), len(seq.block_table))
        table = seq.block_table
        n = 0
        for i in range(seq.num_freed_blocks, end):
            self._release(table[i])
            table[i] = FREED_BLOCK
            n += 1
        if n:
            seq.num_freed_blocks = end
            self.num_window_freed_blocks += n
        return n

    # ---- internals -------------------------------------------------------------------------------------------
    def _release(self, b: int) -> None:
        self._release_many((b,))

    def _release_many(self, blocks) -> None:
        """One reference less on each block, in order; at none a block goes to the free queue (keyed: to the
        evictable end)."""
        refs, keys, free = self._refs, self._keys, self._free
        for b in blocks:
            refs[b] -= 1
            if refs[b] == 0:
                free[b] = None
                if keys[b] is None:
                    # key-less blocks go to the front: used first, and recently used memory is warm in caches
                    free.move_to_end(b, last=False)

    def _take(self) -> int:
        b, _ = self._free.popitem(last=False)
        k = self._keys[b]
        if k is not None:  # evict: the key no longer names this block
            del self._cached[k]
            self._keys[b] = None
            self.num_evicted_blocks += 1
        self._refs[b] = 1
        return b

    def _cached_prefix(self, seq: Sequence) -> tuple[int, list[int]]:
        """The longest cached prefix of `seq`, leaving at least one token to compute (its logits are needed) and
        never the last partial block: (leading blocks it needs no K/V of, the cached blocks after them). Without
        a window every block of the prefix is needed; with one, only those from the first block its first
        computed token can see (a key is chained over every token before it, so a cached key proves the
        prefix equal, whether or not the blocks before it are still cached)."""
        if not self.enable_prefix_caching or seq.num_prompt_logprobs is not None:
            return 0, []  # prompt_logprobs need the logits of every prompt position (vLLM skips the cache too)
        n = min(seq.num_tokens - 1, seq.hash_limit) // self.block_size
        if n == 0:
            return 0, []
        found = list(map(self._cached.get, self._block_keys(seq, n)[:n]))
        if self.window is None:  # every block of the prefix is needed: it ends at the first miss
            best = found.index(None) if None in found else n
            return 0, found[:best]  # type: ignore[return-value]
        best, run = 0, 0  # blocks of the best prefix; cached blocks in a row ending at block m - 1
        for m in range(1, n + 1):
            run = run + 1 if found[m - 1] is not None else 0
            if run == m or (self.window is not None and
                            run >= m - first_visible_block(m * self.block_size, self.window, self.block_size)):
                best = m
            elif self.window is None:
                break
        skip = 0 if self.window is None else first_visible_block(best * self.block_size, self.window,
                                                                 self.block_size)
        return skip, found[skip:best]  # type: ignore[return-value]

    def _block_keys(self, seq: Sequence, n: int) -> list[bytes]:
        """Keys of the first `n` full blocks of `seq` (computed once per block, kept on the sequence)."""
        return seq.extend_block_keys(n, self.root, self.block_size, self.mrope)
