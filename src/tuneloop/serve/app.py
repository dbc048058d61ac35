"""The HTTP API: OpenAI-compatible endpoints over the engine, plus classify, feedback, admin, metrics and the
review page (/review, also served alone by `create_review_app`: no model loaded).

The official `openai` client works against it unchanged. Every error, bad requests included, answers in
OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with a 4xx status; busy means 429 with
`Retry-After`; a body over the limit 413. Every answer names the version that produced it (header
`X-Tuneloop-Version`, and `system_fingerprint` in OpenAI's bodies).
"""

from __future__ import annotations

import contextlib
import json
import time

from fastapi import FastAPI

from ..feedback import FeedbackStore
from .dependencies import ServeSettings
from .engine import Engine
from .errors import add_error_handlers, error_body
from .follow import Follower
from .metrics import Metrics
from .routers import admin, classify, feedback, openai, ops, review


def create_app(engine: Engine, settings: ServeSettings, store: FeedbackStore | None = None,
               review_settings: review.ReviewSettings | None = None) -> FastAPI:
    follower = Follower(engine, settings.workspace, settings.follow_interval) if settings.workspace else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # The follower runs while the app serves: names loaded from `NAME@ALIAS` track that alias's holder.
        if follower is not None:
            follower.start()
        try:
            yield
        finally:
            if follower is not None:
                follower.stop()

    app = FastAPI(title="tuneloop serve", version="1", description=__doc__, lifespan=lifespan)
    metrics = Metrics(engine)
    # Handlers read these through serve/dependencies.py.
    app.state.engine, app.state.settings, app.state.store, app.state.metrics = engine, settings, store, metrics
    app.state.follower = follower
    add_error_handlers(app)
    # Plain ASGI middlewares: Starlette's BaseHTTPMiddleware would hide client disconnects from handlers.
    # The body limit sits inside _Observe, so its 413s are counted too.
    app.add_middleware(_LimitBody, limit=settings.max_body_bytes)
    app.add_middleware(_Observe, metrics=metrics)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(classify.router)
    app.include_router(feedback.router)
    app.include_router(admin.router)
    review.include(app, review_settings, logs_responses=settings.log_responses and store is not None)
    return app


def create_review_app(store: FeedbackStore, settings: review.ReviewSettings | None = None,
                      max_body_bytes: int = 1 << 20) -> FastAPI:
    """The review page and its API alone (`tuneloop review`): the same router `create_app` mounts."""
    from fastapi.responses import RedirectResponse

    app = FastAPI(title="tuneloop review", version="1", description=review.__doc__)
    app.state.store = store
    add_error_handlers(app)
    app.add_middleware(_LimitBody, limit=max_body_bytes)
    review.include(app, settings)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/review/", status_code=307)

    return app


class _Observe:
    """Counts requests by route and status and times them until the last byte (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.observe(route, status[0], time.perf_counter() - t0)


class _LimitBody:
    """413 for a request body over `limit` bytes, before any handler parses it, on every route.

    A declared Content-Length over the limit is refused without reading a byte; a body without one
    (chunked) is read here, counting, up to the limit and then handed on whole, so no handler ever holds
    more than `limit` bytes of a request.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = None
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                declared = v
        if declared is not None:
            if not declared.strip().isdigit():
                return await _refuse(send, 400, "Content-Length: not a byte count", "invalid_value")
            if int(declared) > self.limit:
                return await _refuse(send, 413, f"request body of {int(declared)} bytes is over this server's "
                                                f"limit of {self.limit} bytes", "request_too_large")
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body was in
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _refuse(send, 413, f"request body is over this server's limit of {self.limit} bytes",
                                     "request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then disconnects as they come

        await self.app(scope, replay, send)


async def _refuse(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
