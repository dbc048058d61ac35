"""The HTTP API: OpenAI-compatible endpoints over the engine, plus classify, feedback, admin and metrics.

The official `openai` client works against it unchanged. Every error, bad requests included, answers in
OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with a 4xx status; busy means 429 with
`Retry-After`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, NotFoundError, TuneloopError
from ..feedback import FeedbackStore
from .engine import Engine, GenRequest, QueueFull, SamplingParams
from .metrics import Metrics


# ---------------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def _error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_tuneloop(e: TuneloopError, param: str | None = None) -> APIError:
    if isinstance(e, QueueFull):
        return APIError(429, str(e), "rate_limit_exceeded", None, "queue_full", {"Retry-After": "1"})
    if isinstance(e, NotFoundError):
        return APIError(404, str(e), "invalid_request_error", param, "model_not_found" if param == "model" else
                        "not_found")
    return APIError(400, str(e), "invalid_request_error", param, "invalid_value")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 429)}


# ---------------------------------------------------------------------------- request bodies
class _Req(BaseModel):
    # Fields the OpenAI API has but we do not act on (penalties, logprobs, user, …) are accepted and ignored,
    # as clients send them by default; the ones that would change the answer are checked in the handler.
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Req):
    type: str = Field(description="Only `text` parts are understood.")
    text: Optional[str] = None


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(_Req):
    include_usage: bool = False


class _GenParams(_Req):
    model: str = Field(description="Base model name, an adapter / run name, or (later) a registry alias.",
                       max_length=256)
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 = greedy. Default 1.")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Nucleus sampling mass. Default 1.")
    max_tokens: Optional[int] = Field(None, ge=1, description="New tokens at most (capped by the server).")
    stop: Union[str, list[str], None] = Field(None, description="Up to 4 strings that end the answer.")
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1, description="Makes sampling reproducible.")
    min_tokens: Optional[int] = Field(None, ge=0, description="Extension (as in vLLM): no end-of-sequence before "
                                      "this many tokens.")
    n: Optional[int] = Field(1, description="Only 1 is supported.")
    stream: Optional[bool] = Field(False, description="Server-sent events, ending in `data: [DONE]`.")
    stream_options: Optional[StreamOptions] = None


class ChatCompletionRequest(_GenParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Alias of max_tokens.")


class CompletionRequest(_GenParams):
    prompt: Union[str, list[str]] = Field(description="One prompt (a list of one is accepted).")
    echo: Optional[bool] = False


class ClassifyRequest(_Req):
    model: str = Field(max_length=256, description="A classification run's name.")
    input: Union[str, list[str]] = Field(validation_alias=AliasChoices("input", "texts"),
                                         description="One text or a list of texts (`texts` is accepted too).")


class FeedbackRequest(_Req):
    response_id: str = Field(max_length=64, description="The `id` of a chat completion or completion.")
    rating: Optional[int] = Field(None, ge=1, le=5, description="1 (bad) … 5 (good).")
    correction: Optional[str] = Field(None, max_length=100_000, description="The answer it should have given.")
    comment: Optional[str] = Field(None, max_length=10_000)
    user: Optional[str] = Field(None, max_length=128)


class AdapterRequest(_Req):
    action: Literal["load", "unload"] = Field("load", description="`load` also replaces an adapter of that name.")
    name: str = Field(max_length=128, description="Public name requests use in `model`.")
    path: Optional[str] = Field(None, max_length=4096,
                                description="Run folder or PEFT adapter folder on the server (for `load`).")


# ---------------------------------------------------------------------------- settings
@dataclass
class ServeSettings:
    api_keys: list[str] = field(default_factory=list)
    admin_keys: list[str] = field(default_factory=list)  # for /admin; when empty, the API keys
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    classify_max_texts: int = 256
    log_responses: bool = True


# ---------------------------------------------------------------------------- app
def create_app(engine: Engine, settings: ServeSettings, store: FeedbackStore | None = None) -> FastAPI:
    app = FastAPI(title="tuneloop serve", version="1", description=__doc__)
    metrics = Metrics(engine)
    app.state.engine, app.state.settings, app.state.store, app.state.metrics = engine, settings, store, metrics
    keys = [k.encode() for k in settings.api_keys]
    admin_keys = [k.encode() for k in settings.admin_keys]

    # ---- errors: always OpenAI's shape
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(_error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(TuneloopError)
    async def _tl_error(request: Request, e: TuneloopError):
        return await _api_error(request, from_tuneloop(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(_error_body(msg, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return JSONResponse(_error_body(str(e.detail), "invalid_request_error", None, None),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    # A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide client disconnects from handlers.
    app.add_middleware(_Observe, metrics=metrics)

    def check_key(request: Request, accepted: list[bytes], what: str) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip().encode(), k) for k in accepted):
            raise APIError(401, f"missing or wrong {what}: send `Authorization: Bearer <key>`",
                           "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    def auth(request: Request) -> None:
        if keys:
            check_key(request, keys, "API key")

    def admin_auth(request: Request) -> None:
        # Loading adapters reads server paths: with admin keys set, an ordinary API key is not enough.
        if admin_keys:
            check_key(request, admin_keys, "admin key")
        elif keys:
            check_key(request, keys, "API key")

    secured, admin = [Depends(auth)], [Depends(admin_auth)]

    # ---- open endpoints
    @app.get("/health", tags=["ops"])
    async def health() -> dict:
        return {"status": "ok", "base": engine.base_name, "adapters": len(engine.adapters),
                "running": engine.running(), "queued": engine.queue_depth()}

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse, dependencies=secured)
    async def prometheus():
        body, ctype = metrics.render()
        return PlainTextResponse(body, media_type=ctype)

    # ---- models
    @app.get("/v1/models", dependencies=secured, responses=ERRORS)
    async def list_models() -> dict:
        return {"object": "list", "data": [
            {"id": m["id"], "object": "model", "created": m["created"], "owned_by": "tuneloop", "kind": m["kind"]}
            for m in engine.list_models()]}

    # ---- generation
    def sampling(body: _GenParams, max_tokens: int | None) -> SamplingParams:
        if body.n not in (None, 1):
            raise APIError(400, "n: only n=1 is supported", param="n", code="unsupported_value")
        if max_tokens is not None and max_tokens > settings.max_new_tokens:
            raise APIError(400, f"max_tokens: {max_tokens} is above this server's limit of "
                                f"{settings.max_new_tokens}", param="max_tokens", code="invalid_value")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: at most 4 non-empty strings", param="stop", code="invalid_value")
        return SamplingParams(max_new_tokens=max_tokens or settings.max_new_tokens,
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                              min_tokens=min(body.min_tokens or 0, max_tokens or settings.max_new_tokens))

    def check_prompt(ids: list[int], param: str) -> None:
        if len(ids) > settings.max_prompt_tokens:
            raise APIError(400, f"{param}: the prompt has {len(ids)} tokens, above this server's limit of "
                                f"{settings.max_prompt_tokens}", param=param, code="context_length_exceeded")
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param=param, code="invalid_value")

    def chat_ids(messages: list[ChatMessage]) -> list[int]:
        msgs = []
        for m in messages:
            c = m.content
            if isinstance(c, list):
                if any(p.type != "text" for p in c):
                    raise APIError(400, "messages: only text content parts are supported", param="messages")
                c = "".join(p.text or "" for p in c)
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": c or ""})
        tok = engine.tok
        if getattr(tok, "chat_template", None):
            try:
                out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
            except Exception as e:  # the template itself rejects some conversations (role order, …)
                raise APIError(400, f"messages: the model's chat template rejected them ({e})", param="messages")
            return list(out["input_ids"])
        text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
        return tok(text)["input_ids"]

    async def generate(request: Request, model: str, ids: list[int], params: SamplingParams, stops: list[str]):
        """Yield text deltas as they come, then one final `(None, finish_reason)`; frees the slot on exit."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = GenRequest(prompt_ids=ids, params=params,
                         on_token=lambda t: loop.call_soon_threadsafe(q.put_nowait, ("t", t)),
                         on_finish=lambda r: loop.call_soon_threadsafe(q.put_nowait, ("f", r)))
        engine.submit(req, model)
        metrics.requests_started(model)
        tokens: list[int] = []
        sent = 0
        hold = max((len(s) for s in stops), default=1) - 1
        reason, cut = "stop", -1
        try:
            while True:
                kind, val = await q.get()
                if kind == "f":
                    reason = val
                    break
                tokens.append(val)
                text = engine.tok.decode(tokens, skip_special_tokens=True)
                hits = [i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0]
                if hits:
                    cut = min(hits)
                    engine.cancel(req)  # frees the slot before the next step
                    if cut > sent:
                        yield text[sent:cut], None
                    reason = "stop"
                    break
                # Hold back a partial UTF-8 character and what could be the start of a stop string.
                safe = len(text) - hold
                if text.endswith("\ufffd"):
                    safe = min(safe, len(text) - 1)
                if safe > sent:
                    yield text[sent:safe], None
                    sent = safe
            if reason not in ("stop", "length", "cancelled"):
                metrics.errors.inc()
                raise APIError(503, f"generation failed: {reason}", "server_error", None, "engine_error")
            if cut < 0:
                text = engine.tok.decode(tokens, skip_special_tokens=True)
                if len(text) > sent:
                    yield text[sent:], None
            metrics.tokens(model, len(tokens))
            yield None, ("length" if reason == "length" else "stop"), len(tokens)
        finally:
            if not req.finished:
                engine.cancel(req)

    async def run_to_end(request: Request, gen) -> tuple[str, str, int]:
        """Collect a whole answer, giving up (and freeing the slot) if the client goes away."""
        async def collect():
            parts, reason, n = [], "stop", 0
            async for item in gen:
                if item[0] is None:
                    reason, n = item[1], item[2]
                else:
                    parts.append(item[0])
            return "".join(parts), reason, n

        async def gone():
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)

        task, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(gone())
        try:
            done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            # Cancelling the collector unwinds the generator, whose `finally` frees the engine slot.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise APIError(499, "client disconnected", code="client_closed")
        finally:
            watch.cancel()

    async def log(rid: str, model: str, endpoint: str, prompt, output: str, reason: str) -> None:
        if store is not None and settings.log_responses:
            await run_in_threadpool(store.log_response, rid, model, endpoint, prompt, output, reason)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    @app.post("/v1/chat/completions", dependencies=secured, responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = sampling(body, max_tokens)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        _check_model(engine, body.model)
        ids = chat_ids(body.messages)
        check_prompt(ids, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_log = [m.model_dump() for m in body.messages]
        gen = generate(request, body.model, ids, params, stops)
        first = await _first(gen)  # errors such as a full queue surface here, before any byte is sent

        if not body.stream:
            text, reason, n = await run_to_end(request, _chain(first, gen))
            await log(rid, body.model, "chat", prompt_log, text, reason)
            return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": reason}],
                    "usage": _usage(len(ids), n)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
            yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
            parts = []
            async for item in _guard(_chain(first, gen)):
                if isinstance(item, str):
                    yield item
                elif item[0] is None:
                    reason, n = item[1], item[2]
                    yield sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                    "finish_reason": reason}]})
                    if include_usage:
                        yield sse({**base, "choices": [], "usage": _usage(len(ids), n)})
                    await log(rid, body.model, "chat", prompt_log, "".join(parts), reason)
                else:
                    parts.append(item[0])
                    yield sse({**base, "choices": [{"index": 0, "delta": {"content": item[0]}, "logprobs": None,
                                                    "finish_reason": None}]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions", dependencies=secured, responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        params = sampling(body, body.max_tokens)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise APIError(400, "prompt: send one prompt per request", param="prompt", code="unsupported_value")
            prompt = body.prompt[0]
        else:
            prompt = body.prompt
        _check_model(engine, body.model)
        ids = engine.tok(prompt)["input_ids"]
        check_prompt(ids, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        gen = generate(request, body.model, ids, params, stops)
        first = await _first(gen)
        echo = prompt if body.echo else ""

        if not body.stream:
            text, reason, n = await run_to_end(request, _chain(first, gen))
            await log(rid, body.model, "completion", prompt, text, reason)
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "text": echo + text, "logprobs": None, "finish_reason": reason}],
                    "usage": _usage(len(ids), n)}

        async def events():
            base = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
            parts = []
            if echo:
                yield sse({**base, "choices": [{"index": 0, "text": echo, "logprobs": None, "finish_reason": None}]})
            async for item in _guard(_chain(first, gen)):
                if isinstance(item, str):
                    yield item
                elif item[0] is None:
                    yield sse({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                    "finish_reason": item[1]}]})
                    await log(rid, body.model, "completion", prompt, "".join(parts), item[1])
                else:
                    parts.append(item[0])
                    yield sse({**base, "choices": [{"index": 0, "text": item[0], "logprobs": None,
                                                    "finish_reason": None}]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---- classification
    @app.post("/v1/classify", dependencies=secured, responses=ERRORS)
    async def classify(body: ClassifyRequest) -> dict:
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > settings.classify_max_texts:
            raise APIError(400, f"input: give 1 to {settings.classify_max_texts} texts", param="input")
        _check_model(engine, body.model)
        try:
            fut = engine.classify(body.model, texts)
        except TuneloopError as e:
            raise from_tuneloop(e, "model") from None
        labels, probs = await asyncio.wrap_future(fut)
        data = []
        for i, row in enumerate(probs.tolist()):
            best = max(range(len(labels)), key=lambda j: row[j])
            data.append({"index": i, "label": labels[best],
                         "probabilities": {l: round(p, 6) for l, p in zip(labels, row)}})
        return {"object": "list", "model": body.model, "data": data}

    # ---- feedback
    @app.post("/v1/feedback", dependencies=secured, responses=ERRORS, status_code=201)
    async def feedback(body: FeedbackRequest) -> dict:
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

    # ---- admin: hot-swap
    @app.get("/admin/adapters", dependencies=admin, tags=["admin"], responses=ERRORS)
    async def adapters() -> dict:
        return {"data": engine.list_models()}

    @app.post("/admin/adapters", dependencies=admin, tags=["admin"], responses=ERRORS)
    async def admin_adapters(body: AdapterRequest) -> dict:
        if body.action == "load":
            if not body.path:
                raise APIError(400, "path: required to load an adapter", param="path")
            try:
                fut = engine.load_adapter(body.name, body.path)
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
                "kind": getattr(info, "kind", None)}

    return app


# ---------------------------------------------------------------------------- helpers
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


def _check_model(engine: Engine, name: str) -> None:
    try:
        engine.resolve(name)
    except NotFoundError as e:
        raise APIError(404, str(e), "invalid_request_error", "model", "model_not_found") from None
    except ConfigError as e:
        raise APIError(400, str(e), "invalid_request_error", "model", "invalid_value") from None


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


_END = object()


async def _first(gen):
    """Start a generator so its submit errors raise now; returns its first item (or _END)."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return _END
    except TuneloopError as e:
        raise from_tuneloop(e, "model") from None


async def _guard(items):
    """Inside a stream the status line is gone: an error becomes an `error` event (as OpenAI sends)."""
    try:
        async for item in items:
            yield item
    except APIError as e:
        yield f"data: {json.dumps(_error_body(e.message, e.type, e.param, e.code))}\n\n"


async def _chain(first, gen):
    if first is not _END:
        yield first
    async for item in gen:
        yield item

