"""How the generator service gets its adapter and its engine: the engine in its own process (the default), or
in this one (`--no-engine-process`, for debugging).

With the engine process, this (gRPC) process keeps what its per-request work needs — tokenizer, processor and
config for the Redis fetch, build_engine_request and the M-RoPE positions (computed from the config alone) —
on a weightless adapter, and the engine-core process loads the LM weights (`load_lm`) and only steps. Without
it, this process loads the LM weights and steps them in a thread (AsyncLLMEngine).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from mmpipe.services.generator.config import GeneratorConfig

log = logging.getLogger(__name__)


@dataclass
class GeneratorEngine:
    """The adapter the front works with, the engine front (AsyncLLMEngine or EngineCoreClient) and what the
    engine's process holds in weights (shared/models/partial.HeldWeights)."""

    adapter: Any
    engine: Any
    weights: Any


def engine_config(cfg: GeneratorConfig, *, device: str, dtype: Any, max_model_len: int | None):
    from mmpipe.shared.engine import EngineConfig

    return EngineConfig(block_size=cfg.block_size, num_kv_blocks=cfg.kv_cache_blocks,
                        gpu_memory_utilization=cfg.gpu_memory_utilization, max_num_seqs=cfg.max_num_seqs,
                        max_num_batched_tokens=cfg.max_num_batched_tokens, max_model_len=max_model_len,
                        device=device, dtype=dtype, enable_cuda_graphs=not cfg.enforce_eager,
                        enable_prefix_caching=cfg.enable_prefix_caching,
                        tensor_parallel_size=cfg.tensor_parallel_size, model=cfg.model)


def load_lm(model: str, *, dtype: Any, device: str, trust_remote_code: bool,
            tensor_parallel_size: int = 1) -> tuple[Any, dict[str, Any]]:
    """The engine-core process's loader: the LM weights only, and what they hold (for the weights_bytes gauge).

    Tensor parallel: rank 0's shard only (the engine starts the other ranks, which read their own)."""
    from transformers.utils.logging import disable_progress_bar

    from mmpipe.shared.models.partial import HeldWeights, held_bytes
    from mmpipe.shared.models.registry import held_weights, load_adapter

    disable_progress_bar()  # a tqdm bar is noise in JSON logs
    if tensor_parallel_size > 1:
        from mmpipe.shared.engine.tp.sharding import ShardSource, load_lm_shard

        shard = load_lm_shard(ShardSource(model, dtype, device, trust_remote_code), 0, tensor_parallel_size)
        return shard, {"weights": HeldWeights(held_bytes(shard), "lm", (f"rank 0 of {tensor_parallel_size}",))}
    adapter = load_adapter(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, part="lm")
    return adapter.model, {"weights": held_weights(adapter)}


def load_front_adapter(cfg: GeneratorConfig):
    """Tokenizer, processor and config, no weights; with generation_config.json's EOS ids (from_config alone
    would take the model config's, which can differ, and the front sets each request's EOS ids)."""
    from transformers import GenerationConfig

    from mmpipe.shared.models.light import load_preprocess_adapter

    adapter = load_preprocess_adapter(cfg.model, mm_processor_kwargs=cfg.mm_processor_kwargs,
                                      trust_remote_code=cfg.trust_remote_code)
    try:
        adapter.model.generation_config = GenerationConfig.from_pretrained(cfg.model)
    except OSError:  # no generation_config.json: the one derived from the model config, as from_pretrained does
        pass
    return adapter


def build_engine(cfg: GeneratorConfig) -> GeneratorEngine:
    """Load what the generator needs and start its engine (blocking: minutes for a large model)."""
    from mmpipe.shared.models.registry import resolve_device, resolve_dtype

    if not cfg.engine_process:
        return _build_in_process(cfg)
    from mmpipe.services.common.logs import resolve_format, setup_logging
    from mmpipe.shared.engine import EngineCoreClient, EngineCoreSpec

    adapter = load_front_adapter(cfg)
    device = resolve_device(cfg.device)
    if device == "cuda":
        device = "cuda:0"  # what the model's tensors report; resolved here so the front never touches CUDA
    dtype = resolve_dtype(cfg.dtype, device)
    max_len = cfg.max_model_len or getattr(adapter.text_config, "max_position_embeddings", None)
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    spec = EngineCoreSpec(load=load_lm, engine_config=engine_config(cfg, device=device, dtype=dtype,
                                                                     max_model_len=max_len),
                          load_kwargs={"model": cfg.model, "dtype": dtype, "device": device,
                                       "trust_remote_code": cfg.trust_remote_code,
                                       "tensor_parallel_size": cfg.tensor_parallel_size},
                          setup=functools.partial(setup_logging, "generator-engine-core", level,
                                                  resolve_format(cfg.server.log_format)))
    client = EngineCoreClient(spec, max_waiting=cfg.max_waiting)
    log.info("engine core running in process %d", client.pid)
    return GeneratorEngine(adapter, client, client.load_info["weights"])


def _build_in_process(cfg: GeneratorConfig) -> GeneratorEngine:
    from transformers.utils.logging import disable_progress_bar

    from mmpipe.shared.engine import AsyncLLMEngine, LLMEngine
    from mmpipe.shared.errors import UnsupportedError
    from mmpipe.shared.models.registry import held_weights, load_adapter

    if cfg.tensor_parallel_size > 1:
        raise UnsupportedError("--tensor-parallel-size > 1 needs the engine process (drop --no-engine-process)",
                               param="tensor_parallel_size")
    disable_progress_bar()
    adapter = load_adapter(cfg.model, dtype=cfg.dtype, device=cfg.device, mm_processor_kwargs=cfg.mm_processor_kwargs,
                           trust_remote_code=cfg.trust_remote_code, part="lm")
    max_len = cfg.max_model_len or getattr(adapter.text_config, "max_position_embeddings", None)
    ecfg = engine_config(cfg, device=str(adapter.device), dtype=adapter.model.dtype, max_model_len=max_len)
    engine = AsyncLLMEngine(LLMEngine(adapter.model, ecfg), max_waiting=cfg.max_waiting)
    return GeneratorEngine(adapter, engine, held_weights(adapter))
