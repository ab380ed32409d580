"""The FastAPI app of ``mindport serve``: OpenAI's chat and text completions over an :class:`Engine`.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true``
answers server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /health``,
``GET /metrics`` (Prometheus text) and ``GET /`` (the chat page).

A request is submitted to the engine, whose thread hands each :class:`TokenEvent` to the asyncio loop
(``call_soon_threadsafe``); the request's coroutine turns the events into text (:mod:`.text`). A
request whose client goes away (streamed or not), or whose reply reached a stop string, is cancelled
on the engine, so its slot is freed at the next step. Every bad request is answered with OpenAI's
error JSON (:mod:`.protocol`): 400 for bad input, 404 for an unknown model or route, 405 for a wrong
method, 429 when the queue is full, 500 for a failure (the server lives on); every answer is counted
in ``/metrics`` by endpoint and status (499, nginx's "client closed request": a client that left).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from importlib import resources
from typing import AsyncIterator, Awaitable, Sequence, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from mindport.infer.engine import Engine, QueueFull, SamplingParams, TokenEvent
from mindport.serve.metrics import Metrics
from mindport.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from mindport.serve.text import ReplyText
from mindport.tokenizer import Tokenizer

logger = logging.getLogger("mindport.serve")
T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for a request whose client disconnected before the answer
# how an engine-side end of a request that is not a normal finish is answered
ENGINE_FAILURES = {"timeout": (408, "the request timed out"), "error": (500, "generation failed"),
                   "cancelled": (503, "the server is shutting down")}


class Generation:
    """One request on the engine; ``pieces()`` yields its reply text, then ``finish_reason`` and the
    token counts are set."""

    def __init__(self, server: "Server", model: str, prompt_ids: list[int], params: SamplingParams,
                 stop_strings: Sequence[str]):
        self.server = server
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.reply = ReplyText(server.tokenizer, prompt_ids, params.stop_token_ids, stop_strings)
        self.arrival = time.monotonic()
        self._events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_event(event: TokenEvent) -> None:  # on the engine's thread: hand over, never raise
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self._events.put_nowait, event)

        try:
            self.request_id = server.engine.submit(model, prompt_ids, params, on_event, server.timeout)
        except QueueFull:
            raise APIError(429, f"the server is busy ({server.engine.stats()['waiting']} requests waiting): "
                                "retry later") from None
        except ValueError as err:
            raise APIError(400, str(err)) from None
        server.metrics.prompt_tokens.inc(self.prompt_tokens)

    async def pieces(self) -> AsyncIterator[str]:
        metrics, last = self.server.metrics, self.arrival
        try:
            while self.finish_reason is None:
                event = await self._events.get()
                if event.token is not None:
                    now = time.monotonic()
                    metrics.token(now - last, first=self.completion_tokens == 0)
                    last, self.completion_tokens = now, self.completion_tokens + 1
                    piece = self.reply.push(event.token)
                    if piece:
                        yield piece
                    if self.reply.stopped:  # a stop string: the reply is complete
                        self.finish_reason = "stop"
                        break
                if event.finish_reason in ("stop", "length"):
                    self.finish_reason = event.finish_reason
                    rest = self.reply.flush()
                    if rest:
                        yield rest
                elif event.finish_reason is not None:
                    self.finish_reason = event.finish_reason
                    status, message = ENGINE_FAILURES.get(event.finish_reason, (500, "generation failed"))
                    raise APIError(status, message + (f": {event.error}" if event.error else ""))
        finally:
            if self.finish_reason is None or self.reply.stopped:  # the client went away, or a stop string
                self.server.engine.cancel(self.request_id)
            metrics.finished.labels(self.finish_reason or "disconnected").inc()

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Server:
    """What the routes share: the engine, the tokenizer, the served model names and the metrics.

    ``models`` lists the engine's model names, the base model first, then its adapters.
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer, models: Sequence[str], max_len: int,
                 timeout: float | None = None):
        self.engine, self.tokenizer, self.models = engine, tokenizer, list(models)
        self.max_len, self.timeout = max_len, timeout
        self.metrics = Metrics(engine.stats)
        self.created = int(time.time())

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "mindport",
                "root": self.models[0], "parent": None if name == self.models[0] else self.models[0],
                "max_model_len": self.max_len}

    def check_model(self, name: str) -> str:
        if name not in self.models:
            raise APIError(404, f"model '{name}': not served here (served: {', '.join(self.models)})",
                           param="model", code="model_not_found")
        return name

    def token_budget(self, prompt_tokens: int, requested: int | None) -> int:
        """``max_tokens`` of a request: the requested number, or what the context leaves."""
        if requested is None and prompt_tokens < self.max_len:
            return self.max_len - prompt_tokens
        if requested is None or prompt_tokens + requested > self.max_len:
            raise APIError(400, f"the context is {self.max_len} tokens, the request asks for "
                                f"{prompt_tokens + (requested or 1)} ({prompt_tokens} of prompt, {requested or 1} "
                                f"of completion): shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        return requested

    def start(self, request: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int],
              stop_ids: Sequence[int]) -> Generation:
        params = SamplingParams(max_tokens=self.token_budget(len(prompt_ids), request.token_limit),
                                temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                                stop_token_ids=frozenset(stop_ids))
        return Generation(self, request.model, prompt_ids, params, request.stop or [])


def _internal(err: Exception) -> APIError:
    logger.exception("internal error", exc_info=err)
    return APIError(500, f"internal error: {type(err).__name__}: {err}")


def _chunk(kind: str, request_id: str, created: int, model: str, choices: list[dict], usage: dict | None,
           include_usage: bool) -> dict:
    body = {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices}
    return {**body, "usage": usage} if include_usage else body


async def _events(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-sent events of ``chunks``, then ``[DONE]``; an error after the 200 is sent as an event."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except APIError as err:
        yield f"data: {json.dumps(err.body(), ensure_ascii=False)}\n\n"
    except Exception as err:  # a bug: reported in the stream, and the server lives on
        yield f"data: {json.dumps(_internal(err).body(), ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


async def _chat_chunks(generation: Generation, request: ChatCompletionRequest) -> AsyncIterator[dict]:
    rid, created, usage = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), request.include_usage

    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _chunk("chat.completion.chunk", rid, created, request.model, [choice], None, usage)

    yield chunk({"role": "assistant", "content": ""})
    async for piece in generation.pieces():
        yield chunk({"content": piece})
    yield chunk({}, generation.finish_reason)
    if usage:
        yield _chunk("chat.completion.chunk", rid, created, request.model, [], generation.usage(), True)


async def _completion_chunks(generation: Generation, request: CompletionRequest) -> AsyncIterator[dict]:
    rid, created, usage = f"cmpl-{uuid.uuid4().hex}", int(time.time()), request.include_usage

    def chunk(text: str, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return _chunk("text_completion", rid, created, request.model, [choice], None, usage)

    async for piece in generation.pieces():
        yield chunk(piece)
    yield chunk("", generation.finish_reason)
    if usage:
        yield _chunk("text_completion", rid, created, request.model, [], generation.usage(), True)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or, if the client disconnects first, ``work`` cancelled (a generation's cancel
    frees its engine slot) and an :class:`APIError` ``CLIENT_CLOSED`` (nobody reads it: it is counted)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:  # the body was read: the next message is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # a no-op once it is done
    if not task.done():  # the client left first
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise APIError(CLIENT_CLOSED, "the client disconnected")
    return task.result()


class _AnswerCounter:
    """ASGI middleware counting every answer by endpoint (the route's path, "other" for none) and HTTP
    status; an exception no handler caught is answered here with a 500 in OpenAI's error JSON."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception as err:  # a bug: answered, and the server lives on
            if status is not None:  # the answer had begun: nothing else can be sent
                raise
            status = 500
            await JSONResponse(_internal(err).body(), status_code=500)(scope, receive, send)
        finally:
            if status is not None:
                routes = {route.path for route in scope["app"].routes}
                endpoint = scope["path"] if scope["path"] in routes else "other"
                self.metrics.requests.labels(endpoint, str(status)).inc()


def build_app(server: Server) -> FastAPI:
    """The app; its lifespan starts the engine and, at shutdown, lets running requests finish."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        await asyncio.to_thread(server.engine.shutdown, drain=True)

    app = FastAPI(title="mindport", lifespan=lifespan)
    app.add_middleware(_AnswerCounter, metrics=server.metrics)
    tok = server.tokenizer
    page = resources.files("mindport.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):  # no such route (404), wrong method (405)
        message = f"{request.method} {request.url.path}: {err.detail}"
        if err.status_code == 405:
            message += f" (allowed: {err.headers['Allow']})"
        return JSONResponse(APIError(err.status_code, message).body(), status_code=err.status_code,
                            headers=err.headers)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", **server.engine.stats()}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card(name) for name in server.models]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse(await request.body(), ChatCompletionRequest)
        server.check_model(body.model)
        try:  # the template writes its own special tokens; it may refuse a conversation (e.g. roles not alternating)
            ids = tok.apply_chat_template([m.as_template_message() for m in body.messages], add_generation_prompt=True)
            stop_ids = tok.stop_ids(chat=True)  # EOS and the template's end-of-turn token
        except ValueError as err:
            raise APIError(400, f"'messages': {err}", param="messages") from None
        generation = server.start(body, ids, stop_ids)
        if body.stream:
            return StreamingResponse(_events(_chat_chunks(generation, body)), media_type="text/event-stream")
        text = await _unless_disconnected(request, generation.text())
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": generation.finish_reason}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "choices": [choice], "usage": generation.usage()}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse(await request.body(), CompletionRequest)
        server.check_model(body.model)
        ids = body.prompt if isinstance(body.prompt, list) else tok.encode(body.prompt)
        if not ids:
            raise APIError(400, "'prompt': encodes to no tokens", param="prompt")
        generation = server.start(body, ids, tok.stop_ids(chat=False))
        if body.stream:
            return StreamingResponse(_events(_completion_chunks(generation, body)), media_type="text/event-stream")
        text = await _unless_disconnected(request, generation.text())
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": generation.finish_reason}
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "choices": [choice], "usage": generation.usage()}

    return app
