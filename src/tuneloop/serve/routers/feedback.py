"""`POST /v1/feedback`: a rating and/or a correction for an answer this server logged, by its response id."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from ...errors import NotFoundError
from ..dependencies import StoreDep, require_api_key
from ..errors import ERRORS, APIError, from_tuneloop
from ..schemas import FeedbackRequest

router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


@router.post("/v1/feedback", status_code=201)
async def feedback(body: FeedbackRequest, store: StoreDep) -> dict:
    if body.rating is None and not body.correction:
        raise APIError(400, "give a rating, a correction, or both", param="rating")
    if store is None:
        raise APIError(404, "this server has no feedback store", code="not_found")
    try:
        fid = await run_in_threadpool(store.add_feedback, body.response_id, body.rating, body.correction,
                                      body.comment, body.user)
    except NotFoundError as e:
        raise from_tuneloop(e, "response_id") from None
    return {"id": fid, "object": "feedback", "response_id": body.response_id}
