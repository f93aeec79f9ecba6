"""The OpenAI-compatible HTTP API (aiohttp): routes, auth, errors, streaming.

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``DELETE /v1/models/{id}`` (admin),
``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /health``. Every answer that
is not a success is an OpenAI-shaped error (bus/gateway/errors.py), whatever the request
held: the middleware turns any exception into one, and an unexpected one is logged here
and answered 500 without a traceback.

A stream's headers go out once the first token (or the refusal) is known, so a refused
request gets its real status (400, 404, 429, 503) rather than a 200 whose body says
otherwise. The server runs with aiohttp's handler cancellation: a client that closes the
connection cancels its handler, and leaving the generation's iterator cancels the
generation on its node (bus/gateway/upstream.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Awaitable, Callable

import msgspec
from aiohttp import web

from bus.gateway.auth import Keys
from bus.gateway.errors import OpenAIError, from_lama
from bus.gateway.requests import ChatCompletionRequest, CompletionRequest, decode_chat, decode_completion
from bus.gateway.responses import ChunkWriter, chat_completion, model_object, now, text_completion
from bus.gateway.sse import ClientGone, EventStream
from bus.gateway.upstream import Generation, Upstream, new_request_id
from wire.api import LlmResult, LlmToken
from wire.errors import LamaError

log = logging.getLogger("lamabus.openai")

MAX_BODY = 8 << 20
"""Bytes a request body may have (4096 messages of 64 KiB would not fit anyway; more is a 413)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), status=status, content_type="application/json",
                        headers=headers)


def error_response(exc: OpenAIError) -> web.Response:
    return web.Response(body=exc.encode(), status=exc.status, content_type="application/json", headers=exc.headers())


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OpenAIError as exc:
        return error_response(exc)
    except LamaError as exc:
        return error_response(from_lama(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            return error_response(OpenAIError(404, f"no such endpoint: {request.method} {request.path}",
                                              code="unknown_url"))
        if exc.status == 405:
            return error_response(OpenAIError(405, f"{request.method} is not allowed on {request.path}",
                                              code="method_not_allowed"))
        if exc.status == 413:
            return error_response(OpenAIError(413, f"the request body is larger than {MAX_BODY} bytes",
                                              code="request_too_large"))
        return error_response(OpenAIError(exc.status, exc.reason or "HTTP error", code="http_error"))
    except (asyncio.CancelledError, ClientGone, ConnectionError):
        raise
    except Exception as exc:
        # A bug: the client gets a coded error (no traceback); the log gets the traceback.
        log.exception("%s %s failed", request.method, request.path)
        return error_response(OpenAIError(500, f"internal error ({type(exc).__name__})", code="internal"))


class Gateway:
    """The routes over one :class:`Upstream`. ``max_concurrent`` generations at once; more is 429."""

    def __init__(self, upstream: Upstream, keys: Keys, *, max_concurrent: int = 64) -> None:
        self.upstream = upstream
        self.keys = keys
        self.max_concurrent = max_concurrent
        self.running = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[openai_errors], client_max_size=MAX_BODY)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model}", self.get_model)
        app.router.add_delete("/v1/models/{model}", self.delete_model)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        return app

    def _auth(self, request: web.Request, operation: str) -> str | None:
        """Refuse what the request's key may not do; else its quota author (None without keys)."""
        return self.keys.check(request.headers.get("Authorization"), operation)

    @staticmethod
    def _author(key_author: str | None, user: str | None) -> str:
        """Whom the service's per-author quotas count this request against: the key when keys are
        configured; without keys (loopback only) the body's ``user``, else one shared ``openai``."""
        if key_author is not None:
            return key_author
        return f"openai-user-{user[:200]}" if user else "openai"

    async def health(self, _: web.Request) -> web.Response:
        return _json({"status": "ok"})

    # ------------------------------------------------------------------ models

    async def _models(self) -> list[dict[str, Any]]:
        listing = await self.upstream.models()
        loaded = set(listing.loaded)
        return [model_object(m, loaded=m.id in loaded, active=m.id == listing.active_model_id)
                for m in listing.models]

    async def list_models(self, request: web.Request) -> web.Response:
        self._auth(request, "models.list")
        return _json({"object": "list", "data": await self._models()})

    async def get_model(self, request: web.Request) -> web.Response:
        self._auth(request, "models.list")
        model_id = request.match_info["model"]
        for m in await self._models():
            if m["id"] == model_id:
                return _json(m)
        raise OpenAIError(404, f"the model {model_id!r} does not exist", code="model_not_found", param="model")

    async def delete_model(self, request: web.Request) -> web.Response:
        self._auth(request, "models.remove")
        removed = await self.upstream.remove_model(request.match_info["model"])
        return _json({"id": removed.model.id, "object": "model", "deleted": True})

    # ------------------------------------------------------------------ completions

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        key_author = self._auth(request, "chat")
        req = decode_chat(await request.read())
        turns, params = req.turns(), req.params()
        return await self._run(request, req, params, chat=True, messages=turns,
                               author=self._author(key_author, req.user))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        key_author = self._auth(request, "completions")
        req = decode_completion(await request.read())
        return await self._run(request, req, req.params(), chat=False, prompt=req.text,
                               author=self._author(key_author, req.user))

    async def _run(self, request: web.Request, req: ChatCompletionRequest | CompletionRequest, params: Any, *,
                   chat: bool, author: str, messages: Any = None, prompt: str | None = None) -> web.StreamResponse:
        model = req.model or await self.upstream.active_model()
        if model is None:
            raise OpenAIError(503, "no model is loaded or active: name one in \"model\" (GET /v1/models), or "
                              "activate one (lamabus models activate ID)", code="no_model_loaded", retry_after=5)
        if self.running >= self.max_concurrent:
            raise OpenAIError(429, f"{self.running} generations are running through this gateway "
                              f"(openai_max_concurrent {self.max_concurrent}); try again shortly",
                              code="rate_limit_exceeded", retry_after=1)
        self.running += 1
        try:
            gen = Generation(request_id=new_request_id("chatcmpl" if chat else "cmpl"), model_id=model, params=params,
                             messages=messages, prompt=prompt, author_id=author)
            async with contextlib.aclosing(self.upstream.stream(gen)) as items:
                if req.stream:
                    return await self._stream(request, gen, items, chat=chat, include_usage=req.include_usage)
                result = None
                async for item in items:
                    if isinstance(item, LlmResult):
                        result = item
                assert result is not None  # the iterator ends with the result or raises
                build = chat_completion if chat else text_completion
                return _json(build(gen.request_id, model, now(), result))
        finally:
            self.running -= 1

    async def _stream(self, request: web.Request, gen: Generation, items: Any, *, chat: bool,
                      include_usage: bool) -> web.StreamResponse:
        # The first item decides the status: a refusal raises here, before any header is sent.
        item = await anext(items)
        out = EventStream(request)
        writer = ChunkWriter(gen.request_id, gen.model_id, now(), chat=chat, include_usage=include_usage)
        try:
            await out.open()
            if (opening := writer.first()) is not None:
                await out.send(opening)
            while True:
                if isinstance(item, LlmToken):
                    await out.send(writer.token(item))
                else:
                    for chunk in writer.last(item):
                        await out.send(chunk)
                    await out.done()
                    return out.response
                try:
                    item = await anext(items)
                except LamaError as exc:
                    # Headers are gone: the failure goes in the stream, which then ends (never hangs).
                    log.warning("stream %s failed: %s", gen.request_id, exc.message)
                    await out.fail(from_lama(exc))
                    with contextlib.suppress(ClientGone):
                        await out.response.write_eof()
                    return out.response
        except ClientGone:
            log.info("client left stream %s; cancelling it", gen.request_id)
            return out.response
