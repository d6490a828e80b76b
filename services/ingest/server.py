"""Run the ingest service: `mmpipe ingest --model M --encoder-addr HOST:PORT [flags]`."""
from __future__ import annotations

import asyncio

from mmpipe.services.common.grpc_server import serve
from mmpipe.services.common.logs import setup_logging
from mmpipe.services.common.metrics import ServiceMetrics
from mmpipe.services.common.pb import ingest_pb2, ingest_pb2_grpc
from mmpipe.services.ingest.config import IngestConfig


async def run(cfg: IngestConfig) -> None:
    metrics = ServiceMetrics("ingest", cfg.model)
    state: dict = {}

    def register(server) -> list[str]:
        from mmpipe.services.ingest.servicer import IngestServicer

        ingest_pb2_grpc.add_IngestServicer_to_server(IngestServicer(lambda: state["core"]), server)
        return [ingest_pb2.DESCRIPTOR.services_by_name["Ingest"].full_name]

    async def load() -> None:
        from mmpipe.services.common.stage_clients import EncoderClient, make_channel
        from mmpipe.services.common.warmup import warmup_items
        from mmpipe.services.ingest.core import IngestCore
        from mmpipe.shared.models.light import load_preprocess_adapter

        def _load():
            adapter = load_preprocess_adapter(cfg.model, mm_processor_kwargs=cfg.mm_processor_kwargs,
                                              trust_remote_code=cfg.trust_remote_code)
            for item in warmup_items(adapter):  # the processor's first call pays one-off costs
                adapter.preprocess(item)
            return adapter

        adapter = await asyncio.get_running_loop().run_in_executor(None, _load)
        encoder = EncoderClient(make_channel(cfg.encoder_addr, cfg.server.max_message_mb, cfg.stage_tls))
        state["core"] = IngestCore(cfg, adapter, encoder, metrics)

    async def close() -> None:
        if "core" in state:
            await state["core"].close()

    await serve(name="ingest", cfg=cfg.server, metrics=metrics, register=register, load=load, close=close)


def main(cfg: IngestConfig) -> int:
    setup_logging("ingest", cfg.server.log_level, cfg.server.log_format)
    asyncio.run(run(cfg))
    return 0
