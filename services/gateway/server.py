"""Run the gateway: the HTTP API (uvicorn) and the public gRPC API in one event loop, over one core.

Startup loads the tokenizer/processor (no weights) and opens the stage channels; the gateway's own gRPC
health follows the stages' (SERVING only while every stage is). SIGTERM / SIGINT stop both servers
gracefully: no new requests, in-flight ones finish within --shutdown-grace-s.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from typing import Any

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mmpipe.services.common import tracing
from mmpipe.services.common.grpc_server import connection_age_options
from mmpipe.services.common.pb import gateway_pb2, gateway_pb2_grpc
from mmpipe.shared.chat.templates import renders_tools

from .config import GatewayConfig
from .core import GatewayCore
from .grpc_api.servicer import GatewayServicer
from .http.app import build_app, readiness
from .http.connections import guarded_h11
from .model_info import load_model_info
from .stages import StageClients

logger = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
HEALTH_POLL_S = 2.0
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # image_embeds and data: URLs can be large (FACTS: set both sides)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: `serve()` below owns SIGTERM / SIGINT for both servers."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


async def _follow_stage_health(core: GatewayCore, servicer: health.aio.HealthServicer, redis: Any) -> None:
    serving = None
    while True:
        ok, _ = await readiness(core, redis)
        if ok != serving:
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await servicer.set(name, status)
            logger.info("gateway %s", "ready: every stage is SERVING" if ok else "not ready: waiting for stages")
            serving = ok
        await asyncio.sleep(HEALTH_POLL_S)


async def serve(cfg: GatewayConfig, *, http_socket: socket.socket | None = None, worker: int | None = None) -> None:
    """Serve until SIGTERM / SIGINT. `http_socket`: a listening socket to accept on instead of binding --port
    (one of --api-server-count workers, which share the parent's socket); `worker`: that worker's index."""
    shutdown_grace_s = cfg.shutdown_grace_s
    tracing.setup("gateway", cfg.otlp_traces_endpoint)
    info = await asyncio.to_thread(load_model_info, cfg.model, chat_template=cfg.chat_template,
                                   max_model_len=cfg.max_model_len, trust_remote_code=cfg.trust_remote_code)
    if cfg.enable_auto_tool_choice and not renders_tools(info.processor, info.chat_template):
        logger.warning("--enable-auto-tool-choice: the chat template does not render `tools`, so the model will "
                       "not see them; pass a tool-aware --chat-template")
    stages = StageClients(cfg.ingest_addr, cfg.encoder_addr, cfg.generator_addr,
                          media_io_kwargs=cfg.media_io_kwargs, tls=cfg.stage_tls, routing=cfg.routing,
                          placeholder_ids=info.placeholder_ids, model=cfg.served_model_name)
    redis = None
    if cfg.redis_url:
        from mmpipe.shared.cache.redis_urls import async_client  # a cluster URL too (redis_urls.py)

        redis = async_client(cfg.redis_url, cfg.redis_options, socket_timeout=1.0, socket_connect_timeout=1.0)
    core = GatewayCore(cfg, info, stages)

    grpc_server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                           ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                           *connection_age_options(cfg.grpc_max_connection_age_ms,
                                                                   cfg.grpc_max_connection_age_grace_ms)])
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(core), grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], grpc_server)
    grpc_addr = f"{cfg.host}:{cfg.grpc_port}"
    bound = (grpc_server.add_secure_port(grpc_addr, cfg.tls.credentials()) if cfg.tls is not None
             else grpc_server.add_insecure_port(grpc_addr))
    if bound == 0:
        raise OSError(f"cannot bind the gRPC port {cfg.host}:{cfg.grpc_port}")
    await grpc_server.start()

    app = build_app(core, redis=redis, worker=worker)
    http = _Uvicorn(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False,
                                   lifespan="off", timeout_graceful_shutdown=int(shutdown_grace_s),
                                   http=guarded_h11(cfg.header_read_timeout_s, core.model_name)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_follow_stage_health(core, health_servicer, redis))
    http_task = asyncio.create_task(http.serve(sockets=[http_socket] if http_socket is not None else None))
    logger.info("gateway for %s: HTTP on http://%s:%d, gRPC on %s:%d, stages ingest=%s encoder=%s generator=%s",
                cfg.served_model_name, cfg.host, cfg.port, cfg.host, cfg.grpc_port, cfg.ingest_addr,
                cfg.encoder_addr, cfg.generator_addr)
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    logger.info("gateway shutting down: finishing in-flight requests (grace %.0f s)", shutdown_grace_s)
    await health_servicer.enter_graceful_shutdown()
    http.should_exit = True
    await asyncio.gather(http_task, grpc_server.stop(shutdown_grace_s), return_exceptions=True)
    watcher.cancel()
    stop_task.cancel()
    await stages.close()
    if redis is not None:
        await redis.aclose()
    tracing.shutdown()  # the spans still queued go out before the process ends
    if http_task.done() and not http_task.cancelled() and http_task.exception() is not None:
        raise http_task.exception()  # e.g. the HTTP port was taken
    logger.info("gateway stopped")
