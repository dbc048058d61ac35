"""The OpenAI API: `/v1/models`, `/v1/chat/completions` and `/v1/completions`, streamed or whole.

The official `openai` client works against it unchanged. A request is checked (sampling, model, prompt
length) before it reaches the engine; once streaming has started the status line is gone, so a later error
becomes an `error` event, as OpenAI sends it.

Every answer names the version that produced it (the one its request was admitted on): as OpenAI's
`system_fingerprint`, in the `X-Tuneloop-Version` header, and in the feedback store's `model_version`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ...errors import TuneloopError
from ...feedback import FeedbackStore
from ..dependencies import (VERSION_HEADER, EngineDep, MetricsDep, ServeSettings, SettingsDep, StoreDep,
                            require_api_key)
from ..engine import Engine, GenRequest, SamplingParams
from ..errors import ERRORS, APIError, check_model, error_body, from_tuneloop
from ..metrics import Metrics
from ..schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, GenParams

router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


@router.get("/v1/models")
async def list_models(engine: EngineDep) -> dict:
    return {"object": "list", "data": [
        {"id": m["id"], "object": "model", "created": m["created"], "owned_by": "tuneloop", "kind": m["kind"],
         "version": m["version"], "follows": m["follows"]}
        for m in engine.list_models()]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response, engine: EngineDep,
                           settings: SettingsDep, metrics: MetricsDep, store: StoreDep):
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = _sampling(body, max_tokens, settings)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    check_model(engine, body.model)
    ids = _chat_ids(engine, body.messages)
    _check_prompt(ids, "messages", settings)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_log = [m.model_dump() for m in body.messages]
    served: dict = {}
    gen = _generate(engine, metrics, body.model, ids, params, stops, served)
    first = await _first(gen)  # errors such as a full queue surface here, before any byte is sent
    version = served["version"]

    if not body.stream:
        text, reason, n = await _run_to_end(request, _chain(first, gen))
        await _log(store, settings, rid, body.model, "chat", prompt_log, text, reason, version)
        response.headers[VERSION_HEADER] = version
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "system_fingerprint": version,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": reason}],
                "usage": _usage(len(ids), n)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "system_fingerprint": version}
        yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
        parts = []
        async for item in _guard(_chain(first, gen)):
            if isinstance(item, str):
                yield item
            elif item[0] is None:
                reason, n = item[1], item[2]
                yield _sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                 "finish_reason": reason}]})
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(len(ids), n)})
                await _log(store, settings, rid, body.model, "chat", prompt_log, "".join(parts), reason, version)
            else:
                parts.append(item[0])
                yield _sse({**base, "choices": [{"index": 0, "delta": {"content": item[0]}, "logprobs": None,
                                                 "finish_reason": None}]})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={VERSION_HEADER: version})


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, response: Response, engine: EngineDep,
                      settings: SettingsDep, metrics: MetricsDep, store: StoreDep):
    params = _sampling(body, body.max_tokens, settings)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise APIError(400, "prompt: send one prompt per request", param="prompt", code="unsupported_value")
        prompt = body.prompt[0]
    else:
        prompt = body.prompt
    check_model(engine, body.model)
    ids = engine.tok(prompt)["input_ids"]
    _check_prompt(ids, "prompt", settings)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    served: dict = {}
    gen = _generate(engine, metrics, body.model, ids, params, stops, served)
    first = await _first(gen)
    version = served["version"]
    echo = prompt if body.echo else ""

    if not body.stream:
        text, reason, n = await _run_to_end(request, _chain(first, gen))
        await _log(store, settings, rid, body.model, "completion", prompt, text, reason, version)
        response.headers[VERSION_HEADER] = version
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "system_fingerprint": version, "choices": [{"index": 0, "text": echo + text, "logprobs": None, "finish_reason": reason}],
                "usage": _usage(len(ids), n)}

    async def events():
        base = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "system_fingerprint": version}
        parts = []
        if echo:
            yield _sse({**base, "choices": [{"index": 0, "text": echo, "logprobs": None, "finish_reason": None}]})
        async for item in _guard(_chain(first, gen)):
            if isinstance(item, str):
                yield item
            elif item[0] is None:
                yield _sse({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                 "finish_reason": item[1]}]})
                await _log(store, settings, rid, body.model, "completion", prompt, "".join(parts), item[1],
                           version)
            else:
                parts.append(item[0])
                yield _sse({**base, "choices": [{"index": 0, "text": item[0], "logprobs": None,
                                                 "finish_reason": None}]})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={VERSION_HEADER: version})


# ---------------------------------------------------------------------------- checks before the engine
def _sampling(body: GenParams, max_tokens: int | None, settings: ServeSettings) -> SamplingParams:
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


def _check_prompt(ids: list[int], param: str, settings: ServeSettings) -> None:
    if len(ids) > settings.max_prompt_tokens:
        raise APIError(400, f"{param}: the prompt has {len(ids)} tokens, above this server's limit of "
                            f"{settings.max_prompt_tokens}", param=param, code="context_length_exceeded")
    if not ids:
        raise APIError(400, f"{param}: the prompt is empty", param=param, code="invalid_value")


def _chat_ids(engine: Engine, messages: list[ChatMessage]) -> list[int]:
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


# ---------------------------------------------------------------------------- generation
async def _generate(engine: Engine, metrics: Metrics, model: str, ids: list[int], params: SamplingParams,
                    stops: list[str], served: dict):
    """Yield text deltas as they come, then one final `(None, finish_reason)`; frees the slot on exit.

    Once submitted, `served["version"]` is the version the request was admitted on."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    req = GenRequest(prompt_ids=ids, params=params,
                     on_token=lambda t: loop.call_soon_threadsafe(q.put_nowait, ("t", t)),
                     on_finish=lambda r: loop.call_soon_threadsafe(q.put_nowait, ("f", r)))
    engine.submit(req, model)
    served["version"] = req.version
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


async def _run_to_end(request: Request, gen) -> tuple[str, str, int]:
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


_END = object()


async def _first(gen):
    """Start a generator so its submit errors raise now; returns its first item (or _END)."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return _END
    except TuneloopError as e:
        raise from_tuneloop(e, "model") from None


async def _chain(first, gen):
    if first is not _END:
        yield first
    async for item in gen:
        yield item


async def _guard(items):
    """Inside a stream the status line is gone: an error becomes an `error` event (as OpenAI sends)."""
    try:
        async for item in items:
            yield item
    except APIError as e:
        yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"


# ---------------------------------------------------------------------------- answers
async def _log(store: FeedbackStore | None, settings: ServeSettings, rid: str, model: str, endpoint: str, prompt,
               output: str, reason: str, version: str) -> None:
    if store is not None and settings.log_responses:
        await run_in_threadpool(store.log_response, rid, model, endpoint, prompt, output, reason, version)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
