"""Server-sent events as OpenAI streams them: ``data: <json>\\n\\n`` per chunk, ``data: [DONE]`` at the end,
and ``data: {"error": {...}}`` when a stream that already began fails (the official clients raise it)."""

from __future__ import annotations

from aiohttp import web

from bus.gateway.errors import OpenAIError

_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    # Proxies (nginx) must pass each event on as it comes.
    "X-Accel-Buffering": "no",
}


class ClientGone(Exception):
    """The HTTP client closed the connection while we wrote to it."""


class EventStream:
    """One SSE response; every write raises :class:`ClientGone` once the client has left."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers=_HEADERS)

    async def open(self) -> None:
        try:
            await self.response.prepare(self.request)
        except ConnectionError as exc:
            raise ClientGone() from exc

    async def send(self, data: bytes) -> None:
        try:
            await self.response.write(b"data: " + data + b"\n\n")
        except ConnectionError as exc:  # aiohttp's ClientConnectionResetError is one
            raise ClientGone() from exc

    async def fail(self, error: OpenAIError) -> None:
        await self.send(error.encode())

    async def done(self) -> None:
        await self.send(b"[DONE]")
        try:
            await self.response.write_eof()
        except ConnectionError as exc:
            raise ClientGone() from exc
