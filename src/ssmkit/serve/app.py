"""The HTTP routes of ``ssmkit serve`` (a FastAPI app) over the decode engine.

    POST /v1/completions        text in, text out (JSON, or server-sent events with ``stream``)
    POST /v1/chat/completions   messages in (rendered with the model folder's chat template), text out
    GET  /v1/models             the one served model;  GET /v1/models/{id}
    GET  /health                live streams (decoding, waiting) and the bytes of state they hold

Each request is checked (``ssmkit.serve.protocol``), tokenized here, and submitted to the engine
(``ssmkit.serve.engine``), whose thread calls back with events; ``loop.call_soon_threadsafe`` moves them
onto this request's asyncio queue. A streaming response writes one ``data: {chunk}`` per event and ends
with ``data: [DONE]``. A client that goes away cancels its stream: for a stream, Starlette cancels the
response's generator when it sees the disconnect; a non-streaming request polls
``request.is_disconnected()`` while it waits. Either way the engine drops the stream's state at its next
step.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ssmkit.data.tokenizer import Tokenizer
from ssmkit.serve.chat import ChatTemplate, TemplateError
from ssmkit.serve.engine import Engine, EngineFull, EngineStopped, Event
from ssmkit.serve.protocol import APIError, ParsedRequest, Responder, parse_json, parse_request, sse

DISCONNECT_POLL_S = 0.25
"""How often a waiting non-streaming request checks whether its client is still there."""

MAX_BACKLOG = 1024
"""Text pieces a stream may have waiting for a client that has stopped reading (its connection is full)
before the stream is cancelled: what waits for a client stays bounded, as its state is."""


def build_app(
    engine: Engine,
    tokenizer: Tokenizer,
    chat_template: ChatTemplate | None,
    model_name: str,
    max_prompt_tokens: int | None = None,
) -> FastAPI:
    """The ASGI app serving ``engine``'s model under the id ``model_name``."""
    app = FastAPI(title="ssmkit serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "ssmkit"}

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        error = APIError(err.status_code, str(err.detail), code=None)
        return JSONResponse(error.body(), status_code=err.status_code, headers=err.headers)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(
                404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found"
            )
        return model_card

    def prompt_ids(req: ParsedRequest) -> list[int]:
        if req.kind == "chat":
            if chat_template is None:
                raise APIError(
                    400,
                    f"The model `{model_name}` has no chat template (tokenizer_config.json's "
                    "'chat_template' or chat_template.jinja in its folder); use /v1/completions.",
                    param="messages",
                    code="no_chat_template",
                )
            try:
                ids = tokenizer.encode(chat_template.render(req.messages))
            except TemplateError as err:
                raise APIError(400, str(err), param="messages") from None
            param = "messages"
        elif isinstance(req.prompt, str):
            ids, param = tokenizer.encode(req.prompt), "prompt"
        else:
            ids, param = req.prompt, "prompt"
            vocab = engine.model.config.vocab_size
            if not all(0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        if not ids:
            raise APIError(400, "The prompt encodes to no tokens.", param=param)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise APIError(
                400,
                f"The prompt has {len(ids)} tokens; this server takes at most {max_prompt_tokens} "
                "(--max-prompt-tokens).",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    async def generate(request: Request, kind: str):
        req = parse_request(parse_json(await request.body()), kind, model_name)
        ids = prompt_ids(req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        submitted = []

        def deliver(event: Event) -> None:  # on the engine thread
            if event.finish_reason is None and event.error is None and events.qsize() >= MAX_BACKLOG:
                engine.cancel(submitted[0])  # the client stopped reading: bound what waits for it
                event = Event(
                    error=f"the client read none of the last {MAX_BACKLOG} pieces; stream cancelled"
                )
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: the server is gone
                pass

        try:
            stream = engine.submit(ids, req.params, deliver)
        except (EngineFull, EngineStopped) as err:
            raise APIError(503, str(err), code="server_overloaded", type="server_error") from None
        submitted.append(stream)
        responder = Responder(kind, model_name)
        if req.stream:
            body = _stream_events(engine, stream, events, responder, req.include_usage)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        return await _collect(request, engine, stream, events, responder)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    return app


def _error_body(event: Event) -> dict:
    return APIError(503, event.error, code="server_error", type="server_error").body()


async def _stream_events(engine: Engine, stream, events: asyncio.Queue, responder: Responder, usage: bool):
    """The SSE body: a chunk per event, the usage chunk if asked, ``[DONE]``; cancels on disconnect."""
    try:
        if responder.kind == "chat":
            yield sse(responder.chunk(None, role=True))
        while True:
            event = await events.get()
            if event.error is not None:
                yield sse(_error_body(event))
                break
            if event.text or event.finish_reason:
                yield sse(responder.chunk(event.text, event.finish_reason))
            if event.finish_reason:
                if usage:
                    yield sse(responder.usage_chunk(event.prompt_tokens, event.completion_tokens))
                break
        yield sse("[DONE]")
    finally:  # normal end, client gone (cancelled) or server stopping: the slot is freed either way
        engine.cancel(stream)


async def _collect(request: Request, engine: Engine, stream, events: asyncio.Queue, responder: Responder):
    """The non-streaming answer: all events joined; cancels the stream if the client goes away."""
    loop = asyncio.get_running_loop()
    parts: list[str] = []
    get = None
    checked = loop.time()
    try:
        while True:
            if get is None:
                get = asyncio.ensure_future(events.get())
            await asyncio.wait({get}, timeout=DISCONNECT_POLL_S)
            if loop.time() - checked >= DISCONNECT_POLL_S:  # events may never pause: check by the clock
                checked = loop.time()
                if await request.is_disconnected():
                    return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
            if not get.done():
                continue
            event, get = get.result(), None
            if event.error is not None:
                return JSONResponse(_error_body(event), status_code=503)
            parts.append(event.text)
            if event.finish_reason:
                body = responder.full(
                    "".join(parts), event.finish_reason, event.prompt_tokens, event.completion_tokens
                )
                return JSONResponse(body)
    finally:
        if get is not None:
            get.cancel()
        engine.cancel(stream)
