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
"""
from __future__ import annotations

from collections import OrderedDict

from .block_hash import root_key
from .sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Allocator of KV cache blocks; a sequence's `block_table` lists its blocks in token order.

    Blocks are registered in the cache when the step that writes them is scheduled, not after it ran: every
    layer writes the whole step's K/V before any attention of that layer reads the cache, so a sequence
    admitted in the same step (or later) may already read them. A block still to be computed by a chunk of
    a later step is not registered, so a request arriving mid-prefill shares what has been scheduled so far
    and computes the rest itself (its copy is then not registered: the first copy stays the cached one).
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = False,
                 namespace: str = "", mrope: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
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

    def allocate_prompt(self, seq: Sequence) -> bool:
        """Admit `seq`: take its longest cached prefix and new blocks for the rest of its tokens, and set
        `num_computed_tokens` to the cached part. False (nothing changed) when the free blocks do not suffice."""
        hits = self._cached_prefix(seq)
        need = cdiv(seq.num_tokens, self.block_size) - len(hits)
        reviving = sum(1 for b in hits if self._refs[b] == 0)  # cached blocks that sit in the free queue
        if need + reviving > len(self._free):
            return False
        for b in hits:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1
        seq.block_table = hits + [self._take() for _ in range(need)]
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_committed_blocks = len(hits)
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
            if k not in cached and self._keys[b] is None:
                cached[k] = b
                self._keys[b] = k
        seq.num_committed_blocks = n

    def free(self, seq: Sequence) -> None:
        for b in reversed(seq.block_table):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None
                if self._keys[b] is None:
                    # key-less blocks go to the front: used first, and recently used memory is warm in caches
                    self._free.move_to_end(b, last=False)
        seq.block_table = []
        seq.num_committed_blocks = 0

    # ---- internals -------------------------------------------------------------------------------------------
    def _take(self) -> int:
        b, _ = self._free.popitem(last=False)
        k = self._keys[b]
        if k is not None:  # evict: the key no longer names this block
            del self._cached[k]
            self._keys[b] = None
            self.num_evicted_blocks += 1
        self._refs[b] = 1
        return b

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of `seq`, leaving at least one token to compute (its
        logits are needed) and never the last partial block."""
        if not self.enable_prefix_caching or seq.num_prompt_logprobs is not None:
            return []  # prompt_logprobs need the logits of every prompt position (vLLM skips the cache too)
        n = min(seq.num_tokens - 1, seq.hash_limit) // self.block_size
        if n == 0:
            return []
        hits: list[int] = []
        for k in self._block_keys(seq, n)[:n]:
            b = self._cached.get(k)
            if b is None:
                break
            hits.append(b)
        return hits

    def _block_keys(self, seq: Sequence, n: int) -> list[bytes]:
        """Keys of the first `n` full blocks of `seq` (computed once per block, kept on the sequence)."""
        return seq.extend_block_keys(n, self.root, self.block_size, self.mrope)
