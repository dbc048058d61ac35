"""`/admin/adapters`: list, load (or replace) and unload adapters while serving; behind the admin key.

A load reads only what serve/sources.py admits: a folder inside the workspace or a registered version
(`NAME@ALIAS` is then followed); any other path is 403 before it is read.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from ...errors import TuneloopError
from ..dependencies import EngineDep, SettingsDep, require_admin_key
from ..errors import ERRORS, APIError, from_tuneloop
from ..schemas import AdapterRequest
from ..sources import source_for

router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin_key)], responses=ERRORS)


@router.get("/admin/adapters")
async def adapters(engine: EngineDep) -> dict:
    return {"data": engine.list_models()}


@router.post("/admin/adapters")
async def admin_adapters(body: AdapterRequest, engine: EngineDep, settings: SettingsDep) -> dict:
    if body.action == "load":
        if not body.path:
            raise APIError(400, "path: required to load an adapter", param="path")
        try:
            # The registry and the file checks touch disk (and SQLite): off the event loop.
            src = await run_in_threadpool(source_for, settings.workspace, body.path)
            fut = engine.load_adapter(body.name, src.path, version=src.version, follows=src.follows)
        except TuneloopError as e:
            raise from_tuneloop(e, "path") from None
    else:
        try:
            fut = engine.unload_adapter(body.name)
        except TuneloopError as e:
            raise from_tuneloop(e, "name") from None
    try:
        info = await asyncio.wrap_future(fut)
    except TuneloopError as e:
        raise from_tuneloop(e, "path") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # unreadable or mismatched adapter files
        raise APIError(400, f"path: could not load {body.path}: {type(e).__name__}: {e}", param="path") from None
    return {"action": body.action, "name": body.name, "path": getattr(info, "path", None),
            "kind": getattr(info, "kind", None), "version": getattr(info, "version", None),
            "follows": getattr(info, "follows", None)}
