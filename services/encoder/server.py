"""Run the encoder service: `mmpipe encoder --model M --redis-url redis://... [flags]`."""
from __future__ import annotations

import asyncio
import logging

from mmpipe.services.common.grpc_server import serve
from mmpipe.services.common.logs import setup_logging
from mmpipe.services.common.metrics import ServiceMetrics
from mmpipe.services.common.pb import encoder_pb2, encoder_pb2_grpc
from mmpipe.services.encoder.config import EncoderConfig

log = logging.getLogger(__name__)


async def run(cfg: EncoderConfig) -> None:
    metrics = ServiceMetrics("encoder", cfg.model)
    state: dict = {}

    def register(server) -> list[str]:
        from mmpipe.services.encoder.servicer import EncoderServicer

        encoder_pb2_grpc.add_EncoderServicer_to_server(EncoderServicer(lambda: state["core"]), server)
        return [encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name]

    async def load() -> None:
        def _load():
            from mmpipe.services.encoder.core import EncoderCore
            from mmpipe.shared.cache.redis_store import RedisEmbeddingCache
            from mmpipe.shared.cache.redis_urls import sync_client
            from transformers.utils.logging import disable_progress_bar

            from mmpipe.shared.models.registry import held_weights, load_adapter

            cache = RedisEmbeddingCache(cfg.redis_url, ttl_s=cfg.cache_ttl_s, options=cfg.redis_options)
            cache.ping()
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # Every Lookup call is bounded (connect and read) and retried once on a fresh connection, so a
            # restarted Redis is reconnected to by the next call instead of failing or waiting seconds.
            client = sync_client(cfg.redis_url, cfg.redis_options, socket_timeout=5.0, socket_connect_timeout=5.0,
                                 retry=Retry(NoBackoff(), 1))  # redis.Redis, or RedisCluster for a cluster URL
            disable_progress_bar()  # a tqdm bar is noise in JSON logs
            adapter = load_adapter(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                   mm_processor_kwargs=cfg.mm_processor_kwargs,
                                   trust_remote_code=cfg.trust_remote_code, part="towers")
            held = held_weights(adapter)  # the towers only: the LM stays on the meta device
            log.info("encoder %s", held)
            metrics.gauge("weights_bytes", "bytes of model weights this stage holds").labels(cfg.model).set(held.bytes)
            core = EncoderCore(cfg, adapter, cache, client, metrics)
            core.warmup()
            return core

        state["core"] = await asyncio.get_running_loop().run_in_executor(None, _load)

    async def close() -> None:
        if "core" in state:
            await state["core"].close()

    await serve(name="encoder", cfg=cfg.server, metrics=metrics, register=register, load=load, close=close)


def main(cfg: EncoderConfig) -> int:
    setup_logging("encoder", cfg.server.log_level, cfg.server.log_format)
    asyncio.run(run(cfg))
    return 0
