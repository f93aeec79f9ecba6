"""The chat page: static files and a small JSON config, served by aiohttp.

The page (``bus/web/static/``, built from ``web/`` by ``web/build.sh``) is a NATS
client of its own: it speaks to the broker over WebSocket and to lamabus only
through the bus (topics, JetStream history, the request/reply API). This server
only hands out the files and ``config.json``, which tells the page where the
broker's WebSocket listener is and which subject prefix and stream to use.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from bus.config import Settings
from bus.web.listen import http_url, listen, port_free
from bus.subjects import Subjects

log = logging.getLogger("lamabus.web")


def static_dir() -> Path:
    """The built page, installed with the ``bus`` package."""
    return Path(str(resources.files("bus.web") / "static"))


def page_config(ws_url: str | None, prefix: str, user: str | None = None) -> dict[str, Any]:
    """What ``config.json`` tells the page. ``user``: the broker wants a login, as this user, whose password
    is the page's token (never in this file: the page gets it from its address or asks for it)."""
    config = {"wsUrl": ws_url, "prefix": prefix, "stream": Subjects(prefix).stream_name}
    if user is not None:
        config["user"] = user
    return config


def embedded_websocket_port(settings: Settings) -> int | None:
    """The WebSocket port the embedded broker should listen on for the page (None: the page is off)."""
    if settings.web_address is None:
        return None
    port = settings.embedded_ws_port
    return port if port and port_free("127.0.0.1", port) else 0


class WebServer:
    """Serves the chat page on ``host:port`` (a free port if taken); ``url`` says where.

    ``async with WebServer("127.0.0.1", 8080, ws_url="ws://127.0.0.1:4223", prefix="lama") as w: ...``
    """

    def __init__(self, host: str, port: int, *, ws_url: str | None, prefix: str = "lama",
                 url_file: Path | None = None, root: Path | None = None,
                 login: tuple[str, str] | None = None) -> None:
        self.host = host
        #: (user, token): the page logs in to the broker as ``user`` with the token from its address.
        self._login = login
        self.port = port
        self.ws_url = ws_url
        self.prefix = prefix
        self.url_file = url_file
        self.root = root or static_dir()
        self.url: str | None = None
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        config = page_config(self.ws_url, self.prefix, self._login[0] if self._login else None)
        index = self.root / "index.html"
        if not index.is_file():
            raise FileNotFoundError(f"the chat page is not built: {index} is missing (run web/build.sh)")

        async def get_config(_: web.Request) -> web.Response:
            return web.json_response(config, headers={"Cache-Control": "no-store"})

        async def get_index(_: web.Request) -> web.FileResponse:
            return web.FileResponse(index, headers={"Cache-Control": "no-cache"})

        app = web.Application()
        app.router.add_get("/config.json", get_config)
        app.router.add_get("/", get_index)
        app.router.add_static("/static/", self.root, follow_symlinks=False)
        return app

    async def start(self) -> str:
        runner = web.AppRunner(self._app(), access_log=None)
        await runner.setup()
        self._runner = runner
        try:
            sock = listen(self.host, self.port, what="the chat page")
            site = web.SockSite(runner, sock)
            await site.start()
        except BaseException:
            await self.stop()
            raise
        self.port = sock.getsockname()[1]
        self.url = http_url(sock, "/")
        if self.url_file is not None:
            self.url_file.write_text(f"{self.url}\n")
        log.info("chat page on %s (NATS WebSocket %s%s)", self.url, self.ws_url,
                 "; log in with the address printed on stdout" if self._login else "")
        return self.url

    @property
    def login_url(self) -> str | None:
        """The page's address with its login token (``#token=...``, as Jupyter does): a secret, for the
        person who started the service, printed on stdout and never logged. Without a login: ``url``."""
        if self.url is None:
            return None
        return f"{self.url}#token={self._login[1]}" if self._login else self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self.url_file is not None:
            self.url_file.unlink(missing_ok=True)

    async def __aenter__(self) -> "WebServer":
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


def web_server_for(settings: Settings, embedded_ws_url: str | None,
                   login: tuple[str, str] | None = None) -> WebServer | None:
    """The service's chat page server, or None when it is off or the page could not reach a broker.
    ``login``: (user, token) the page logs in with (the embedded broker's chat user)."""
    address = settings.web_address
    if address is None:
        return None
    ws_url = settings.nats_ws_url or embedded_ws_url
    if ws_url is None:
        log.info("no chat page: the external broker's WebSocket URL is not known (--nats-ws-url)")
        return None
    return WebServer(*address, ws_url=ws_url, prefix=settings.prefix, url_file=settings.web_url_file,
                     login=login if settings.nats_ws_url is None else None)
