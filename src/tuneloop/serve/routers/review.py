"""`/review`: the page where domain experts rate, correct and compare answers, and its JSON API.

Everything lands in the feedback store (feedback/), which commits durably before it answers, so the page
says "saved" only after a 2xx from here. Who is reviewing comes from a reviewer key (made by the store,
kept hashed there), sent as `Authorization: Bearer <key>` or, after `POST /review/api/login`, as an
HttpOnly session cookie holding that key (nothing to lose on a restart, nothing kept in server memory).
Without a key only a loopback client may write, as the reviewer `local`: a person at their own laptop.

    GET  /review                     the page (static files from serve/review_page/, no build step, offline)
    POST /review/api/login           {"key"} -> the reviewer, and the session cookie
    POST /review/api/logout          clears the cookie
    GET  /review/api/me              the reviewer, the rubric, reviews wanted per item
    GET  /review/api/queues          what is queued, per queue: items, done, reviews wanted
    POST /review/api/next            {"queue"?} -> {"item": the next item, reserved for this reviewer | null}
    GET  /review/api/items/{id}      one item (a pair's sources stay hidden)
    POST /review/api/items/{id}/review   rating, criteria, thumb, correction, reason | choice -> 201
    POST /review/api/items/{id}/release  gives a reserved item back
    GET  /review/api/progress        per reviewer
    GET  /review/api/agreement       Cohen's kappa / Krippendorff's alpha on items reviewed twice or more
"""

from __future__ import annotations

import ipaddress
import logging
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Depends, Path as PathParam, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator
from starlette.concurrency import run_in_threadpool

from ...errors import ConfigError, DataError, NotFoundError, TuneloopError
from ..errors import ERRORS, APIError

PAGE_DIR = Path(__file__).resolve().parent.parent / "review_page"
# The files the page is made of; nothing else under PAGE_DIR is served.
PAGE_FILES = {"review.js": "text/javascript", "review.css": "text/css"}
COOKIE = "tuneloop_review"
LOCAL_REVIEWER = "local"
SERVED_QUEUE = "served"
DEFAULT_RUBRIC = ("accurate", "tone", "concise")
SETTINGS_FILE = "review.yaml"  # a workspace's review settings (rubric, reviews per item)

log = logging.getLogger("tuneloop.serve")


class ReviewSettings(BaseModel):
    """How a project reviews: `<workspace>/review.yaml` (every key optional), command-line flags over it."""

    model_config = ConfigDict(extra="forbid")
    rubric: list[str] = Field(default_factory=lambda: list(DEFAULT_RUBRIC),
                              description="Criteria a reviewer marks per answer (met / not met).")
    reviews_per_item: int = Field(1, ge=1, le=20, description="Reviews each queued item wants from different "
                                  "reviewers (2 or more gives the agreement view something to measure).")
    reservation_s: float = Field(900, gt=0, description="How long an item stays reserved for the reviewer "
                                 "who took it before it is free for others again.")
    local_reviewer: bool = Field(True, description="Let a loopback client without a key review as `local` "
                                 "(turn off behind a proxy on the same host).")
    queue_served: Optional[bool] = Field(None, description="Queue newly served answers (queue `served`) "
                                         "whenever a reviewer asks for the next item; default: on where the "
                                         "server logs its answers (`tuneloop serve`), off for `tuneloop review`.")

    @field_validator("rubric")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        v = [c.strip() for c in v if c.strip()]
        bad = [c for c in v if not c.replace("_", "").replace("-", "").isalnum() or len(c) > 40]
        if bad:
            raise ValueError(f"criterion {bad[0]!r}: use letters, digits, _ or - (at most 40)")
        if len(set(v)) != len(v):
            raise ValueError("a criterion is named twice")
        return v


def load_review_settings(workspace: Path | None, **overrides) -> ReviewSettings:
    """The workspace's review.yaml (when there is one) with the given non-None values over it."""
    import yaml
    from pydantic import ValidationError

    data: dict = {}
    f = Path(workspace) / SETTINGS_FILE if workspace is not None else None
    if f is not None and f.exists():
        try:
            data = yaml.safe_load(f.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            raise ConfigError(f"{f}:{line + 1 if line is not None else 1}: not valid YAML: "
                              f"{getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{f}:1: expected a mapping of review settings")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ReviewSettings(**data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"{f or 'review settings'}: {where}: {err['msg']}") from None


# ---------------------------------------------------------------------------- request bodies
class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=1, max_length=512)


class NextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queue: Optional[str] = Field(None, max_length=128, description="Only this queue (default: any).")


class ReviewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rating: Optional[int] = Field(None, ge=1, le=5, description="1 (bad) to 5 (good).")
    criteria: Optional[dict[str, StrictBool]] = Field(None, description="Rubric criterion -> met (true / false).")
    thumb: Optional[Literal[-1, 1]] = Field(None, description="-1 down, +1 up.")
    correction: Optional[str] = Field(None, max_length=20000, description="The answer as it should have been.")
    reason: Optional[str] = Field(None, max_length=5000)
    choice: Optional[Literal["A", "B", "equal"]] = Field(None, description="Pairs: the better answer.")


# ---------------------------------------------------------------------------- who is asking
def _store(request: Request):
    store = request.app.state.store
    if store is None:
        raise APIError(404, "this server has no feedback store", code="not_found")
    return store


def _settings(request: Request) -> ReviewSettings:
    return request.app.state.review


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _presented_key(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.cookies.get(COOKIE) or None


def _local_reviewer(request: Request, store) -> dict:
    # Made once per store; its key is never shown, as `local` signs in by being on this machine.
    cached = getattr(request.app.state, "review_local", None)
    if cached is not None and cached[0] is store:
        return cached[1]
    found = next((r for r in store.reviewers() if r["name"] == LOCAL_REVIEWER), None)
    if found is None:
        try:
            found = store.reviewer_for_key(store.add_reviewer(LOCAL_REVIEWER))
        except TuneloopError:  # another process made it first
            found = next(r for r in store.reviewers() if r["name"] == LOCAL_REVIEWER)
    reviewer = {"id": found["id"], "name": found["name"]}
    request.app.state.review_local = (store, reviewer)
    return reviewer


def _same_origin(request: Request) -> None:
    """A browser names the page a request comes from in `Origin`; another site's page (or a rebound DNS name
    aimed at loopback) may not act as a reviewer here, with a cookie or as `local`."""
    origin = request.headers.get("origin")
    if origin is None or request.method in ("GET", "HEAD"):
        return
    host = request.headers.get("host", "")
    if origin.split("://", 1)[-1].rstrip("/") != host:
        raise APIError(403, f"Origin {origin}: requests from another site are refused", code="cross_origin")


async def current_reviewer(request: Request) -> dict:
    store, settings = _store(request), _settings(request)
    _same_origin(request)
    key = _presented_key(request)
    if key is not None:
        reviewer = await run_in_threadpool(store.reviewer_for_key, key)
        if reviewer is None:
            raise APIError(401, "unknown reviewer key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return {**reviewer, "local": False}
    if settings.local_reviewer and _is_loopback(request.client.host if request.client else None):
        return {**await run_in_threadpool(_local_reviewer, request, store), "local": True}
    raise APIError(401, "sign in with your reviewer key (`Authorization: Bearer <key>` or POST /review/api/login); "
                        "only a client on this machine may review without one", code="invalid_api_key",
                   headers={"WWW-Authenticate": "Bearer"})


Reviewer = Annotated[dict, Depends(current_reviewer)]
# a row id: SQL integers stop at 2**63 - 1, and a larger number is simply no such item
ItemId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]


def _bad(e: TuneloopError, fields: tuple[str, ...] = ()) -> APIError:
    """A store error as the client's: 404 for a missing item, 409 for one not theirs to review, else 400
    with the request field the message starts with (the store names it: `rating: ...`)."""
    msg = str(e)
    if isinstance(e, NotFoundError):
        return APIError(404, msg, code="not_found")
    head = msg.split(":", 1)[0].strip()
    param = head if head in fields or head.split(".", 1)[0] in fields else None
    if isinstance(e, DataError) or param is not None:
        return APIError(400, msg, param=param, code="invalid_value")
    return APIError(409, msg, code="conflict")


# ---------------------------------------------------------------------------- the page
page = APIRouter(prefix="/review", include_in_schema=False)


@page.get("")
async def review_root() -> RedirectResponse:
    return RedirectResponse("/review/", status_code=307)


@page.get("/")
async def review_page() -> FileResponse:
    return FileResponse(PAGE_DIR / "index.html", media_type="text/html", headers=_PAGE_HEADERS)


@page.get("/static/{name}")
async def review_static(name: str) -> FileResponse:
    if name not in PAGE_FILES:
        raise APIError(404, f"{name}: no such file", code="not_found")
    return FileResponse(PAGE_DIR / name, media_type=PAGE_FILES[name], headers=_PAGE_HEADERS)


# The page runs only its own files: no inline script, nothing from elsewhere.
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                 "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


# ---------------------------------------------------------------------------- the API
api = APIRouter(prefix="/review/api", tags=["review"], responses=ERRORS)


@api.post("/login")
async def login(body: Login, request: Request, response: Response) -> dict:
    store = _store(request)
    _same_origin(request)
    reviewer = await run_in_threadpool(store.reviewer_for_key, body.key)
    if reviewer is None:
        raise APIError(401, "unknown reviewer key", param="key", code="invalid_api_key")
    # The cookie holds the key itself: HttpOnly (no script reads it), SameSite=Strict (no other site sends it).
    response.set_cookie(COOKIE, body.key, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                        path="/review", max_age=30 * 86400)
    return {"reviewer": reviewer["name"], "id": reviewer["id"]}


@api.post("/logout")
async def logout(response: Response) -> dict:
    response.delete_cookie(COOKIE, path="/review")
    return {"signed_out": True}


@api.get("/me")
async def me(reviewer: Reviewer, request: Request) -> dict:
    s = _settings(request)
    return {"reviewer": reviewer["name"], "id": reviewer["id"], "local": reviewer["local"], "rubric": s.rubric,
            "reviews_per_item": s.reviews_per_item}


@api.get("/queues")
async def queues(reviewer: Reviewer, request: Request) -> dict:
    return {"queues": await run_in_threadpool(_store(request).queues)}


@api.post("/next")
async def next_item(body: NextRequest, reviewer: Reviewer, request: Request) -> dict:
    store, s = _store(request), _settings(request)
    if s.queue_served and body.queue in (None, SERVED_QUEUE):
        # Idempotent in the store; from a minute before the last look on, so each look reads only what is new.
        now, since = time.time(), getattr(request.app.state, "review_served_since", None)
        try:
            await run_in_threadpool(lambda: store.enqueue_served(SERVED_QUEUE, since=since,
                                                                 reviews_wanted=s.reviews_per_item))
            request.app.state.review_served_since = now - 60
        except TuneloopError as e:
            # A logged answer the store will not queue must not stop reviewers from working on the rest.
            log.warning("review: served answers not queued: %s", e)
    try:
        item = await run_in_threadpool(store.reserve_next, reviewer["id"], body.queue, s.reservation_s)
    except TuneloopError as e:
        raise _bad(e, ("queue",)) from None
    return {"item": item}


@api.get("/items/{item_id}")
async def get_item(item_id: ItemId, reviewer: Reviewer, request: Request) -> dict:
    item = await run_in_threadpool(_store(request).get_item, item_id, reviewer["id"])
    if item is None:
        raise APIError(404, f"item {item_id}: no such item", code="not_found")
    return {"item": item}


@api.post("/items/{item_id}/review", status_code=201)
async def submit(item_id: ItemId, body: ReviewBody, reviewer: Reviewer, request: Request) -> dict:
    rubric = _settings(request).rubric
    for name in body.criteria or {}:
        if name not in rubric:
            raise APIError(400, f"criteria.{name}: not in this project's rubric ({', '.join(rubric) or 'empty'})",
                           param=f"criteria.{name}", code="invalid_value")
    fields = tuple(ReviewBody.model_fields)
    try:
        # The store commits durably before it returns: a 201 here means the review survives a crash.
        return await run_in_threadpool(lambda: _store(request).submit_review(
            item_id, reviewer["id"], **body.model_dump(exclude_none=True)))
    except TuneloopError as e:
        raise _bad(e, fields) from None


@api.post("/items/{item_id}/release")
async def release(item_id: ItemId, reviewer: Reviewer, request: Request) -> dict:
    try:
        await run_in_threadpool(_store(request).release, item_id, reviewer["id"])
    except TuneloopError as e:
        raise _bad(e) from None
    return {"released": item_id}


@api.get("/progress")
async def progress(reviewer: Reviewer, request: Request) -> dict:
    return {"progress": await run_in_threadpool(_store(request).progress)}


@api.get("/agreement")
async def agreement(reviewer: Reviewer, request: Request, queue: Optional[str] = None) -> dict:
    return await run_in_threadpool(_store(request).agreement, queue)


def include(app, settings: ReviewSettings | None = None, logs_responses: bool = False) -> None:
    """Mount the page and its API on an app whose `state.store` is the feedback store (or None)."""
    settings = settings or ReviewSettings()
    if settings.queue_served is None:
        settings = settings.model_copy(update={"queue_served": logs_responses})
    app.state.review = settings
    app.include_router(page)
    app.include_router(api)
