"""The sliding-window rule for the paged KV cache: which keys and blocks a windowed query can still see, and
how many blocks a sequence holds when the blocks behind its window are given back.

Query position p of a layer with window W sees keys (p - W, p] (transformers' sliding mask), so the rows of
a chunk starting at position `start` see nothing before key `start - W + 1` and nothing in a block before
`first_visible_block(start, W, block_size)`. Every reader of a windowed layer's cached K/V starts there: the
torch paths (attention/torch_ref.py, the SDPA fallback of attention/triton_paged.py) through
`first_visible_block`, the Triton kernels by the same arithmetic on the device (the decode kernel from key
seq_len - W, the prefill kernel from the first key of its query block's first row). When every layer is
windowed (`DecoderSpec.kv_free_window`: the largest window), the block manager gives a sequence's blocks
before that block back to the free pool mid-sequence; their entries in the block table become `FREED_BLOCK`,
so the table keeps its positions (token i stays in entry i // block_size) and no reader ever looks at them.

Pure integer arithmetic: no torch, no state.
"""
from __future__ import annotations

# a block-table entry whose block was given back (behind every layer's window); never dereferenced
FREED_BLOCK = -1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def first_visible_key(query_start: int, window: int | None) -> int:
    """The first key position a query at `query_start` (or any later one) may see; 0 for a global layer."""
    return 0 if window is None else max(0, query_start - window + 1)


def first_visible_block(query_start: int, window: int | None, block_size: int) -> int:
    """The block holding `first_visible_key`: blocks before it are never read by queries at or after
    `query_start` (they may be freed, and may hold another sequence's K/V by then)."""
    return first_visible_key(query_start, window) // block_size


def peak_blocks(num_tokens: int, block_size: int, window: int | None) -> int:
    """The most blocks one sequence of `num_tokens` tokens must hold at once to advance by one token: all of
    them, or with the blocks behind a window `window` given back, those W consecutive keys can span."""
    n = cdiv(num_tokens, block_size)
    return n if window is None else min(n, cdiv(window - 1, block_size) + 1)
