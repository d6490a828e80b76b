"""HTTP route of POST /v1/completions."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ...http.auth import request_tenant, require_api_key
from ...http.guard import request_admitted
from ...http.cancel import until_disconnect
from ...http.request_id import request_id
from ...http.session import request_session
from .protocol import CompletionRequest

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, raw: Request, rid: str = Depends(request_id)) -> Response:
    return await until_disconnect(raw, raw.app.state.serving_completion.create(
        body, rid, tenant=request_tenant(raw), session=request_session(raw), admitted=request_admitted(raw)))
