"""What a request handler needs from its app, as FastAPI dependencies: settings, engine, store, metrics, keys.

`create_app` puts the shared objects on `app.state`; handlers ask for them by type (`engine: EngineDep`), and
routers require a key with `dependencies=[Depends(require_api_key)]`, so no handler checks a key itself.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

from fastapi import Depends, Request

from ..feedback import FeedbackStore
from .engine import Engine
from .errors import APIError
from .metrics import Metrics


# Every answer names the version that produced it in this header.
VERSION_HEADER = "X-Tuneloop-Version"


@dataclass
class ServeSettings:
    api_keys: list[str] = field(default_factory=list)
    admin_keys: list[str] = field(default_factory=list)  # for /admin; when empty, the API keys
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    classify_max_texts: int = 256
    log_responses: bool = True
    max_body_bytes: int = 1 << 20  # a larger request body gets 413 before it is read any further
    workspace: Optional[Path] = None  # what /admin may load from (with the registry in it); None: nothing
    follow_interval: float = 2.0  # seconds between looks at the aliases the served names follow


# ---------------------------------------------------------------------------- shared state
# async, so FastAPI calls them inline instead of hopping to its thread pool for an attribute read.
async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


async def get_store(request: Request) -> Optional[FeedbackStore]:
    return request.app.state.store


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[ServeSettings, Depends(get_settings)]
StoreDep = Annotated[Optional[FeedbackStore], Depends(get_store)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


# ---------------------------------------------------------------------------- keys
def _check_key(request: Request, accepted: list[str], what: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip().encode(), k.encode())
                                             for k in accepted):
        raise APIError(401, f"missing or wrong {what}: send `Authorization: Bearer <key>`",
                       "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    if settings.api_keys:
        _check_key(request, settings.api_keys, "API key")


async def require_admin_key(request: Request, settings: SettingsDep) -> None:
    # Loading adapters reads server paths: with admin keys set, an ordinary API key is not enough.
    if settings.admin_keys:
        _check_key(request, settings.admin_keys, "admin key")
    elif settings.api_keys:
        _check_key(request, settings.api_keys, "API key")
