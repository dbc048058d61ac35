"""Operations: `/health` (open, for load balancers) and `/metrics` (Prometheus, behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from ..dependencies import EngineDep, MetricsDep, require_api_key

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health(engine: EngineDep) -> dict:
    return {"status": "ok", "base": engine.base_name, "adapters": len(engine.adapters),
            "running": engine.running(), "queued": engine.queue_depth()}


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(require_api_key)])
async def prometheus(metrics: MetricsDep):
    body, ctype = metrics.render()
    return PlainTextResponse(body, media_type=ctype)
