"""EngineConfig: the knobs of the generator engine (cache geometry, batch limits, device, backends)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class EngineConfig:
    """Settings of one `LLMEngine`.

    block_size: tokens per KV block. num_kv_blocks: fixed KV size in blocks; None sizes it from
    `gpu_memory_utilization` after a warm-up on CUDA, or from `cpu_kv_cache_bytes` on the CPU.
    max_num_seqs: sequences running at once. max_num_batched_tokens: tokens per step (the chunked-prefill budget).
    max_model_len: prompt + output tokens of one sequence; None takes the model's max_position_embeddings,
    and it is always capped by what the KV cache can hold, so one sequence alone can always run to the end.
    attention_backend: "auto" (triton on CUDA, torch elsewhere), "torch" (reference) or "triton".
    enable_cuda_graphs: capture decode steps as CUDA graphs (triton backend only), and steps with prefill
    chunks too when mixed_graph_max_prefills > 0: such a step runs as a graph when it holds at most that many
    chunks (more fall back to an eager step); 0 turns mixed-step graphs off.
    pack_weights: see below (triton backend only; re-points the HF model's q/k/v and gate/up parameters).
    enable_prefix_caching: reuse the K/V of full blocks whose tokens, positions and media items equal those of a
    block computed before (block_manager.py); prefix_cache_namespace goes into every block key (name the model
    and its settings there when keys are compared across engines, e.g. by a router).
    tensor_parallel_size: ranks the LM is sharded over (tp/: Megatron-style; rank 0 is the engine's process,
    ranks 1..N-1 worker processes it starts); 1 runs as before, with no process, group or collective.
    model: the checkpoint each rank reads its shard from (None: the model's own name_or_path).
    distributed_timeout_s: the longest any collective (and the workers' start-up) may wait before it is an error.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    enable_cuda_graphs: bool = True
    mixed_graph_max_prefills: int = 8
    # prefill chunks one step may hold: None = mixed_graph_max_prefills when mixed graphs are captured (a step
    # with more runs eagerly, which at 3B size costs more than making the extra prompts wait one step: prefix
    # hits turn a batch of prompts into many short chunks), else no limit; 0 = no limit; n = at most n
    max_prefills_per_step: int | None = None
    attention_backend: str = "auto"
    # triton backend: move each layer's q/k/v and gate/up weights into one buffer each (the HF parameters
    # become views of it; nothing is duplicated) so decode runs one GEMM instead of three / two.
    pack_weights: bool = True
    # CPU only, when num_kv_blocks is None: KV cache budget in bytes.
    cpu_kv_cache_bytes: int = 256 * 1024 * 1024
    enable_prefix_caching: bool = True
    prefix_cache_namespace: str = ""
    # structured outputs: the tokenizer the grammars are compiled against (a path, or a tokenizer object
    # in-process); None takes the model's name_or_path
    tokenizer: Any = None
    tensor_parallel_size: int = 1
    model: str | None = None
    distributed_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.mixed_graph_max_prefills < 0:
            raise ValueError("mixed_graph_max_prefills must be >= 0")
        if self.max_prefills_per_step is not None and self.max_prefills_per_step < 0:
            raise ValueError("max_prefills_per_step must be >= 0 (0: no limit)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"unknown attention_backend {self.attention_backend!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.distributed_timeout_s <= 0:
            raise ValueError("distributed_timeout_s must be > 0")
        if isinstance(self.dtype, str):
            self.dtype = getattr(torch, self.dtype)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def resolved_backend(self) -> str:
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if self.torch_device.type == "cuda" else "torch"
