"""Attention backends behind one switch: "torch" (reference, any device) and "triton" (CUDA only).

The triton module is imported only when asked for, so CPU processes never import GPU code.
"""
from __future__ import annotations

from .base import AttentionBackend, AttentionMetadata


def create_backend(name: str, **kwargs) -> AttentionBackend:
    if name == "torch":
        from .torch_ref import TorchRefBackend

        return TorchRefBackend(**kwargs)
    if name == "triton":
        from .triton_paged import TritonPagedBackend

        return TritonPagedBackend(**kwargs)
    raise ValueError(f"unknown attention backend {name!r}")


__all__ = ["AttentionBackend", "AttentionMetadata", "create_backend"]
