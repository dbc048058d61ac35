"""The HTTP API: OpenAI-compatible endpoints over the engine, plus classify, feedback, admin and metrics.

The official `openai` client works against it unchanged. Every error, bad requests included, answers in
OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with a 4xx status; busy means 429 with
`Retry-After`.
"""

from __future__ import annotations

import time

from fastapi import FastAPI

from ..feedback import FeedbackStore
from .dependencies import ServeSettings
from .engine import Engine
from .errors import add_error_handlers
from .metrics import Metrics
from .routers import admin, classify, feedback, openai, ops


def create_app(engine: Engine, settings: ServeSettings, store: FeedbackStore | None = None) -> FastAPI:
    app = FastAPI(title="tuneloop serve", version="1", description=__doc__)
    metrics = Metrics(engine)
    # Handlers read these through serve/dependencies.py.
    app.state.engine, app.state.settings, app.state.store, app.state.metrics = engine, settings, store, metrics
    add_error_handlers(app)
    # A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide client disconnects from handlers.
    app.add_middleware(_Observe, metrics=metrics)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(classify.router)
    app.include_router(feedback.router)
    app.include_router(admin.router)
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
