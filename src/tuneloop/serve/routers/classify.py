"""`POST /v1/classify`: labels and probabilities from a classification run, for one text or a batch; the
answer names the version that computed them (`version`, and the `X-Tuneloop-Version` header).

Each text is logged in the feedback store (endpoint `classify`, output the predicted label, with its version)
as the chat endpoints log theirs: `tuneloop drift` compares these live inputs with the training data, and
the item's `id` takes feedback through `/v1/feedback` like any other response."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends, Response
from starlette.concurrency import run_in_threadpool

from ...errors import TuneloopError
from ..dependencies import VERSION_HEADER, EngineDep, SettingsDep, StoreDep, require_api_key
from ..errors import ERRORS, APIError, check_model, from_tuneloop
from ..schemas import ClassifyRequest

router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, response: Response, engine: EngineDep, settings: SettingsDep,
                   store: StoreDep) -> dict:
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
    if store is not None and settings.log_responses:
        # one request's texts share a time, and ids that sort in their order (the store orders by both)
        now, rid = time.time(), uuid.uuid4().hex
        rows = [{"id": f"clf-{rid}-{i:04d}", "created": now, "model": body.model, "endpoint": "classify",
                 "prompt": text, "output": d["label"], "finish_reason": "label", "model_version": version}
                for i, (text, d) in enumerate(zip(texts, data))]
        await run_in_threadpool(store.log_responses, rows)
        for d, row in zip(data, rows):
            d["id"] = row["id"]
    response.headers[VERSION_HEADER] = version
    return {"object": "list", "model": body.model, "version": version, "data": data}
