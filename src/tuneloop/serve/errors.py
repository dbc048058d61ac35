"""Every error the API answers, in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `APIError` (or let a `TuneloopError` through); the exception handlers here turn it, FastAPI's
own validation errors and Starlette's HTTP errors into that body with a 4xx status, headers kept.
"""

from __future__ import annotations

from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, NotFoundError, TuneloopError
from .engine import Engine, QueueFull
from .sources import OutsideWorkspace


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_tuneloop(e: TuneloopError, param: str | None = None) -> APIError:
    if isinstance(e, QueueFull):
        return APIError(429, str(e), "rate_limit_exceeded", None, "queue_full", {"Retry-After": "1"})
    if isinstance(e, OutsideWorkspace):
        return APIError(403, str(e), "invalid_request_error", param, "path_not_allowed")
    if isinstance(e, NotFoundError):
        return APIError(404, str(e), "invalid_request_error", param, "model_not_found" if param == "model" else
                        "not_found")
    return APIError(400, str(e), "invalid_request_error", param, "invalid_value")


def check_model(engine: Engine, name: str) -> None:
    """A request's `model` that the engine does not serve is the client's error: 404 (unknown) or 400."""
    try:
        engine.resolve(name)
    except NotFoundError as e:
        raise APIError(404, str(e), "invalid_request_error", "model", "model_not_found") from None
    except ConfigError as e:
        raise APIError(400, str(e), "invalid_request_error", "model", "invalid_value") from None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# The error statuses every API route documents in the OpenAPI schema.
ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429)}


# ---------------------------------------------------------------------------- exception handlers
async def _api_error(request: Request, e: APIError):
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


async def _tl_error(request: Request, e: TuneloopError):
    return await _api_error(request, from_tuneloop(e))


async def _validation(request: Request, e: RequestValidationError):
    errs = e.errors()
    first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return JSONResponse(error_body(msg, "invalid_request_error", param, "invalid_value"), status_code=400)


async def _http(request: Request, e: StarletteHTTPException):
    return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, None),
                        status_code=e.status_code, headers=getattr(e, "headers", None))


def add_error_handlers(app: FastAPI) -> None:
    """Always OpenAI's shape, for bad requests (FastAPI's 422) and unknown routes (Starlette's 404) too."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(TuneloopError, _tl_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
