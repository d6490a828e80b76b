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


async def run(cfg: GeneratorConfig) -> None:
    metrics = ServiceMetrics("generator", cfg.model)
    state: dict = {}

    def register(server) -> list[str]:
        from mmpipe.services.generator.servicer import GeneratorServicer

        generator_pb2_grpc.add_GeneratorServicer_to_server(GeneratorServicer(lambda: state["core"]), server)
        return [generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name]

    async def load() -> None:
        from mmpipe.services.generator.core import GeneratorCore
        from mmpipe.services.generator.engine_setup import build_engine
        from mmpipe.shared.cache.redis_store import RedisEmbeddingCache

        def _load():
            cache = RedisEmbeddingCache(cfg.redis_url, options=cfg.redis_options)
            cache.ping()
            # the LM only (the towers stay on the meta device), held by the engine-core process by default
            built = build_engine(cfg)
            log.info("generator %s", built.weights)
            metrics.gauge("weights_bytes", "bytes of model weights this stage holds").labels(cfg.model).set(
                built.weights.bytes)
            return cache, built.adapter, built.engine

        cache, adapter, aengine = await asyncio.get_running_loop().run_in_executor(None, _load)
        core = GeneratorCore(cfg, adapter, aengine, cache, metrics)
        await core.warmup()
        state["core"] = core

    async def close() -> None:
        if "core" in state:
            await state["core"].close()

    def alive() -> bool:  # liveness: false once the engine loop (thread or process) is dead
        return "core" not in state or state["core"].engine.is_alive()

    await serve(name="generator", cfg=cfg.server, metrics=metrics, register=register, load=load, close=close,
                alive=alive)


def main(cfg: GeneratorConfig) -> int:
    setup_logging("generator", cfg.server.log_level, cfg.server.log_format)
    asyncio.run(run(cfg))
    return 0
