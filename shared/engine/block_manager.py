"""BlockManager: hands out fixed-size KV blocks from one free list and takes them back."""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Free-list allocator of KV cache blocks; a sequence's `block_table` lists its blocks in token order.

    No prefix caching: multimodal prompts would need the embedding rows in the block hash, and this engine
    serves mostly unique images.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """More blocks `seq` needs so that its first `num_tokens` tokens have slots."""
        return max(0, cdiv(num_tokens, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        n = self.blocks_needed(seq, num_tokens)
        if n > len(self._free):
            raise RuntimeError("out of KV blocks (the scheduler should have checked)")
        seq.block_table.extend(self._free.popleft() for _ in range(n))

    def free(self, seq: Sequence) -> None:
        # Freed blocks go to the front: recently used memory is more likely to be warm in caches.
        self._free.extendleft(reversed(seq.block_table))
        seq.block_table = []
