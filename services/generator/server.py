"""Run the generator service: `mmpipe generator --model M --redis-url redis://... [flags]`."""
from __future__ import annotations

import asyncio
import logging

from mmpipe.services.common.grpc_server import serve
from mmpipe.services.common.logs import setup_logging
from mmpipe.services.common.metrics import ServiceMetrics
from mmpipe.services.common.pb import generator_pb2, generator_pb2_grpc
from mmpipe.services.generator.config import GeneratorConfig

log = logging.getLogger(__name__)


def _make_engine(cfg: GeneratorConfig, adapter, max_model_len):
    from mmpipe.shared.engine import AsyncLLMEngine, EngineConfig, LLMEngine

    model = adapter.model
    ecfg = EngineConfig(block_size=cfg.block_size, num_kv_blocks=cfg.kv_cache_blocks,
                        gpu_memory_utilization=cfg.gpu_memory_utilization, max_num_seqs=cfg.max_num_seqs,
                        max_num_batched_tokens=cfg.max_num_batched_tokens, max_model_len=max_model_len,
                        device=str(adapter.device), dtype=model.dtype, enable_cuda_graphs=not cfg.enforce_eager)
    return AsyncLLMEngine(LLMEngine(model, ecfg), max_waiting=cfg.max_waiting)


async def run(cfg: GeneratorConfig) -> None:
    metrics = ServiceMetrics("generator", cfg.model)
    state: dict = {}

    def register(server) -> list[str]:
        from mmpipe.services.generator.servicer import GeneratorServicer

        generator_pb2_grpc.add_GeneratorServicer_to_server(GeneratorServicer(lambda: state["core"]), server)
        return [generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name]

    async def load() -> None:
        from mmpipe.services.generator.core import GeneratorCore
        from mmpipe.shared.cache.redis_store import RedisEmbeddingCache
        from transformers.utils.logging import disable_progress_bar

        from mmpipe.shared.models.registry import held_weights, load_adapter

        def _load():
            cache = RedisEmbeddingCache(cfg.redis_url, options=cfg.redis_options)
            cache.ping()
            disable_progress_bar()  # a tqdm bar is noise in JSON logs
            adapter = load_adapter(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                   mm_processor_kwargs=cfg.mm_processor_kwargs, trust_remote_code=cfg.trust_remote_code,
                                   part="lm")
            held = held_weights(adapter)  # the LM only: the towers stay on the meta device
            log.info("generator %s", held)
            metrics.gauge("weights_bytes", "bytes of model weights this stage holds").labels(cfg.model).set(held.bytes)
            max_len = cfg.max_model_len or getattr(adapter.text_config, "max_position_embeddings", None)
            return cache, adapter, _make_engine(cfg, adapter, max_len)

        cache, adapter, aengine = await asyncio.get_running_loop().run_in_executor(None, _load)
        core = GeneratorCore(cfg, adapter, aengine, cache, metrics)
        await core.warmup()
        state["core"] = core

    async def close() -> None:
        if "core" in state:
            await state["core"].close()

    await serve(name="generator", cfg=cfg.server, metrics=metrics, register=register, load=load, close=close)


def main(cfg: GeneratorConfig) -> int:
    setup_logging("generator", cfg.server.log_level)
    asyncio.run(run(cfg))
    return 0
