"""Every HTTP error in the OpenAI shape `{"error": {message, type, param, code}}`, status from the one table.

Domain errors map through `MMPipeError.http_status` (shared/errors.py), the same table the gRPC side uses;
FastAPI's validation errors become 400 (not FastAPI's 422), unknown routes keep their 404/405, and anything
unexpected is a logged 500 that says no more than its type. 429 and 503 carry `Retry-After`.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmpipe.shared.errors import InvalidInputError, MMPipeError, NotFoundError, openai_error_body

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


def error_headers(err: MMPipeError) -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)} if err.http_status in (429, 503) else {}


def error_response(err: MMPipeError) -> JSONResponse:
    return JSONResponse(openai_error_body(err), status_code=err.http_status, headers=error_headers(err))


def validation_error(exc: RequestValidationError) -> InvalidInputError:
    """FastAPI's list of problems as one readable message, naming the first offending field."""
    msgs, first = [], None
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        first = first or loc or None
        msgs.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return InvalidInputError("invalid request: " + "; ".join(msgs) if msgs else "invalid request", param=first)


class _HTTPError(MMPipeError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.http_status = status
        self.error_type = "not_found_error" if status == 404 else "invalid_request_error"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MMPipeError)
    async def _mmpipe(request: Request, exc: MMPipeError) -> JSONResponse:
        if exc.http_status >= 500:
            logger.warning("request failed: %s %s", exc.http_status, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err: MMPipeError = NotFoundError(f"no route {request.method} {request.url.path}")
        else:
            err = _HTTPError(exc.status_code, str(exc.detail))
        return JSONResponse(openai_error_body(err), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s", request.url.path)
        return error_response(MMPipeError(f"internal error ({type(exc).__name__})"))
