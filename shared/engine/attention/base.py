"""What every attention backend receives per step (AttentionMetadata) and must provide (AttentionBackend).

The batch is flat: T tokens of S sequences, the first `num_decodes` sequences with one token each, then
prefill chunks. Sequence i owns query rows [query_start_loc[i], query_start_loc[i+1]) and, after this step,
`seq_lens[i]` tokens of K/V in its blocks (the cached prefix plus this chunk).
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

    def __init__(self, *, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, scale: float):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.scale = scale

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q (T, H, D) and k, v (T, KVH, D), rotary already applied; caches (num_blocks, block_size, KVH, D).

        Returns (T, H, D)."""
