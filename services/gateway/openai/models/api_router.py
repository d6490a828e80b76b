"""HTTP route of GET /v1/models: the one served model, under each of its served names."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from ...http.auth import require_api_key
from ..protocol import ModelCard, ModelList

router = APIRouter(dependencies=[Depends(require_api_key)])
_CREATED = int(time.time())


@router.get("/v1/models")
async def list_models(raw: Request) -> dict:
    cfg, info = raw.app.state.cfg, raw.app.state.core.info
    names = cfg.served_model_names or (cfg.model,)
    cards = [ModelCard(id=n, created=_CREATED, root=cfg.model, max_model_len=info.max_model_len) for n in names]
    return ModelList(data=cards).model_dump()
