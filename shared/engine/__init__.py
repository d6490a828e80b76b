"""The generator engine: continuous batching over a paged KV cache for the text decoder of HF multimodal
models, fed with precomputed multimodal embedding rows.

    from mmpipe.shared.engine import EngineConfig, LLMEngine, StepOutput
    engine = LLMEngine(hf_model, EngineConfig(device="cuda", dtype=torch.bfloat16))

Layout (nano-vllm style): config, sequence, block_manager, scheduler (what runs each step), model_runner
(inputs, KV cache, CUDA graphs), decoder (our forward over the HF weights), attention/ (torch reference and
Triton backends), kernels/ (CUDA only), sampler, llm_engine (sync loop),
async_engine (asyncio front with a background step thread), core_process + core_client (the same loop in its
own process, and its asyncio front; wire.py is their messages, streams.py the per-request queues both fronts
share).
"""
from __future__ import annotations

from .outputs import StepOutput

__all__ = ["EngineConfig", "LLMEngine", "StepOutput", "AsyncLLMEngine", "EngineCoreClient", "EngineCoreSpec"]


def __getattr__(name: str):
    # Lazy: `import mmpipe.shared.engine` stays cheap (no torch) for code that only needs the output types or
    # `block_hash` (the gateway's router computes the same block keys).
    if name == "EngineConfig":
        from .config import EngineConfig

        return EngineConfig
    if name == "LLMEngine":
        from .llm_engine import LLMEngine

        return LLMEngine
    if name == "AsyncLLMEngine":
        from .async_engine import AsyncLLMEngine

        return AsyncLLMEngine
    if name == "EngineCoreClient":
        from .core_client import EngineCoreClient

        return EngineCoreClient
    if name == "EngineCoreSpec":
        from .core_process import EngineCoreSpec

        return EngineCoreSpec
    raise AttributeError(name)
