"""HTTP routes of POST /tokenize and POST /detokenize (at the root, as vLLM serves them; API key required)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from ...http.auth import require_api_key
from .protocol import DetokenizeRequest, tokenize_request

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/tokenize")
async def tokenize(raw: Request, body: Any = Body(...)) -> dict:
    resp = await raw.app.state.serving_tokenization.tokenize(tokenize_request(body))
    return resp.model_dump()


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, raw: Request) -> dict:
    return (await raw.app.state.serving_tokenization.detokenize(body)).model_dump()
