"""Small helpers shared by adapters: splitting a tower's flat output back into per-item tensors."""
from __future__ import annotations

from typing import Any

import torch

from mmpipe.shared.types import ProcessedItem


def flatten_features(out: Any) -> torch.Tensor:
    """A tower output (a tuple/list of per-item tensors, or one padded/batched tensor) as (rows, hidden)."""
    if isinstance(out, (list, tuple)):
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in out], dim=0)
    return out.reshape(-1, out.shape[-1])


def split_by_tokens(flat: torch.Tensor, items: list[ProcessedItem]) -> list[torch.Tensor]:
    sizes = [int(it.meta["num_tokens"]) for it in items]
    if flat.shape[0] != sum(sizes):
        raise RuntimeError(f"tower produced {flat.shape[0]} rows for items needing {sum(sizes)}")
    return list(torch.split(flat, sizes, dim=0))
