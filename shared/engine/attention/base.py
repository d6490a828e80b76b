"""What every attention backend receives per step (AttentionMetadata) and must provide (AttentionBackend).

The batch is flat: T tokens of S sequences, the first `num_decodes` sequences with one token each, then
prefill chunks. Sequence i owns query rows [query_start_loc[i], query_start_loc[i+1]) and, after this step,
`seq_lens[i]` tokens of K/V in its blocks (the cached prefix plus this chunk).

Masks beyond causal (model_spec.py): a sliding layer passes `window` W, and query position p then sees keys
(p - W, p]; a model whose multimodal runs attend bidirectionally fills `attn_limit`, the last key position
each token row may see (its own position, or the last position of its run), so key j is visible when
j <= attn_limit and, in a sliding layer, j > p - W. A run is never split across prefill chunks (scheduler.py),
so every key a row may see is in the cache or in the chunk when it runs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor        # (T,) cache slot of each new token; -1 writes nothing (padding)
    seq_lens: torch.Tensor            # (S,) int32 context length incl. this step's tokens
    block_tables: torch.Tensor        # (S, max_blocks) int32
    num_decodes: int                  # leading one-token sequences
    # Host copies for per-sequence prefill loops (no device syncs); empty in a CUDA graph's static step.
    query_start_loc_host: list[int]   # S + 1 entries
    seq_lens_host: list[int]
    block_tables_host: list[list[int]] | None = None
    # Device copy of query_start_loc (S + 1,) int32, for kernels that take all prefill chunks in one launch;
    # built lazily by the backend when the runner did not fill it (one H2D per step, shared by all layers).
    query_start_loc: torch.Tensor | None = None
    # Prefill work list (sequence index, query block), two (N,) int32 device tensors, for backends that run
    # every prefill chunk in one launch; built lazily by the backend when the runner did not fill it. A CUDA
    # graph fills a fixed-length list whose unused entries have sequence -1.
    prefill_work: tuple[torch.Tensor, torch.Tensor] | None = None
    # (T,) int32, per token row: the last key position it may attend to (bidirectional multimodal runs); None:
    # causal (the row's own position). Decode rows never need it (their keys all lie behind them).
    attn_limit: torch.Tensor | None = None

    def query_start_loc_device(self, device: torch.device) -> torch.Tensor:
        if self.query_start_loc is None:
            self.query_start_loc = torch.tensor(self.query_start_loc_host, dtype=torch.int32).to(
                device, non_blocking=True)
        return self.query_start_loc

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


class AttentionBackend(ABC):
    """Attends each query row to its own sequence's K/V in the paged cache (the step's new K/V are already
    written into the cache by the decoder's ops; k and v are passed too, for prefills with no cached prefix)."""

    name: str = "base"

    def __init__(self, *, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, scale: float,
                 softcap: float | None = None):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.scale = scale
        self.softcap = softcap  # scores become softcap * tanh(q.k * scale / softcap) (Gemma 2's attn cap)

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, window: int | None = None) -> torch.Tensor:
        """q (T, H, D) and k, v (T, KVH, D), rotary already applied; caches (num_blocks, block_size, KVH, D);
        `window`: this layer's sliding window (None: global).

        Returns (T, H, D)."""
