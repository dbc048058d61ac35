"""`POST /v1/classify`: labels and probabilities from a classification run, for one text or a batch; the
answer names the version that computed them (`version`, and the `X-Tuneloop-Version` header)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Response

from ...errors import TuneloopError
from ..dependencies import VERSION_HEADER, EngineDep, SettingsDep, require_api_key
from ..errors import ERRORS, APIError, check_model, from_tuneloop
from ..schemas import ClassifyRequest

router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, response: Response, engine: EngineDep, settings: SettingsDep) -> dict:
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or len(texts) > settings.classify_max_texts:
        raise APIError(400, f"input: give 1 to {settings.classify_max_texts} texts", param="input")
    check_model(engine, body.model)
    try:
        fut = engine.classify(body.model, texts)
    except TuneloopError as e:
        raise from_tuneloop(e, "model") from None
    labels, probs, version = await asyncio.wrap_future(fut)
    data = []
    for i, row in enumerate(probs.tolist()):
        best = max(range(len(labels)), key=lambda j: row[j])
        data.append({"index": i, "label": labels[best],
                     "probabilities": {l: round(p, 6) for l, p in zip(labels, row)}})
    response.headers[VERSION_HEADER] = version
    return {"object": "list", "model": body.model, "version": version, "data": data}
