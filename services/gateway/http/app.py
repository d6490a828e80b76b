"""The FastAPI app of the gateway: OpenAI routes, /health, /metrics, request ids, auth and error mapping."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..access_log import AccessLog, AccessLogMiddleware
from ..core import GatewayCore
from ..metrics import render
from ..openai.chat_completion.api_router import router as chat_router
from ..openai.chat_completion.serving import OpenAIServingChat
from ..openai.completion.api_router import router as completion_router
from ..openai.completion.serving import OpenAIServingCompletion
from ..openai.models.api_router import router as models_router
from ..openai.tokenization.api_router import router as tokenization_router
from ..openai.tokenization.serving import OpenAIServingTokenization
from .errors import RETRY_AFTER_S, install_error_handlers
from .guard import RequestGuard
from .request_id import RequestIdMiddleware

logger = logging.getLogger(__name__)


async def readiness(core: GatewayCore, redis: Any | None = None, timeout: float = 1.0, *,
                    required: tuple[str, ...] | None = None) -> tuple[bool, dict]:
    """Ready when the `required` stages (default: all) answer SERVING on gRPC health and the cache answers,
    when configured. The report always lists every stage."""
    stages = await core.stages.health(timeout=timeout)
    report: dict[str, Any] = {"stages": stages}
    ok = all(s == "SERVING" for name, s in stages.items() if required is None or name in required)
    if redis is not None:
        try:
            await asyncio.wait_for(redis.ping(), timeout)
            report["cache"] = "SERVING"
        except Exception as e:  # any failure to answer means "not ready": report it, never raise
            report["cache"] = f"UNAVAILABLE ({type(e).__name__})"
            ok = False
    return ok, report


def build_app(core: GatewayCore, *, redis: Any | None = None, worker: int | None = None) -> FastAPI:
    """The app over one core; `worker`: this process's index among --api-server-count workers (None: the only
    one), sent back in the X-MMPipe-Gateway-Worker header so load spread and logs can be matched up."""
    docs = not core.cfg.disable_fastapi_docs  # --disable-fastapi-docs: none of the three routes
    app = FastAPI(title="mmpipe gateway", docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.core = core
    app.state.cfg = core.cfg
    app.state.serving_chat = OpenAIServingChat(core)
    app.state.serving_completion = OpenAIServingCompletion(core)
    app.state.serving_tokenization = OpenAIServingTokenization(core)
    install_error_handlers(app)
    app.include_router(chat_router)
    app.include_router(completion_router)
    app.include_router(models_router)
    app.include_router(tokenization_router)

    @app.get("/health")
    async def health(raw: Request) -> Response:
        ok, report = await readiness(core, redis)
        if ok:
            return JSONResponse({"status": "ok", **report})
        return JSONResponse({"status": "unavailable", **report}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/ready")
    async def ready(raw: Request) -> Response:
        # Load-balancer readiness: every request needs the generator, text-only requests need nothing else, so
        # an ingest or encoder restart must not take every gateway out of rotation. /health stays "all up".
        ok, report = await readiness(core, None, required=("generator",))
        degraded = [s for s, v in report["stages"].items() if v != "SERVING"]
        if ok:
            return JSONResponse({"status": "degraded" if degraded else "ok", **report})
        return JSONResponse({"status": "unavailable", **report}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = render()
        return Response(body, media_type=content_type)

    app.add_middleware(RequestGuard, core=core)  # inside the request id: its refusals are counted and carry the id
    app.add_middleware(RequestIdMiddleware, model=core.model_name, worker=worker)
    # outermost: the line is written after the request id's middleware and the whole response (a stream's too)
    app.add_middleware(AccessLogMiddleware, access_log=AccessLog.of(core.cfg))
    return app
