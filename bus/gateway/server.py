"""Running the gateway: inside ``lamabus serve --openai ADDR``, or alone as ``lamabus gateway``.

Either way it has its own NATS connection (bus/broker/connection.py, with whatever credential
settings that offers) and reaches lamabus only through ``<prefix>.api.*``, so any number of
gateways, on any machines, can stand in front of one node or a cluster. The listener is the
chat page's: the port asked for, or a free one when it is taken (bus/web/listen.py), and the
URL goes to ``<data-dir>/openai.url``. With no API keys configured the gateway binds to
loopback only, whatever address was asked for, and says so.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio

from aiohttp import web
from nats.aio.client import Client

from bus.broker.connection import connect
from bus.config import DEFAULT_GATEWAY_ADDRESS, Settings, parse_address
from bus.gateway.app import Gateway
from bus.gateway.auth import Keys
from bus.gateway.upstream import Upstream
from bus.web.listen import http_url, listen
from storage.tasks import stop_task

log = logging.getLogger("lamabus.openai")

LOOPBACK = "127.0.0.1"

#: How long a close waits for the keep-alive task to end after cancelling it (seconds).
STOP_TIMEOUT = 5.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GatewayServer:
    """``async with GatewayServer(settings, nats_url, "127.0.0.1", 0) as gw: gw.url`` -> ``http://127.0.0.1:PORT``."""

    def __init__(self, settings: Settings, nats_url: str, host: str, port: int, *, url_file: Path | None = None,
                 keys: Keys | None = None, credentials: Any = None) -> None:
        """``credentials``: how the gateway's own NATS connection logs in, as bus/broker/connection.py's
        ``connect`` takes them (None: as that connects by default)."""
        self.settings = settings
        self.credentials = credentials
        self.nats_url = nats_url
        self.host = host
        self.port = port
        self.url_file = url_file
        self.keys = keys
        self.url: str | None = None
        self.nc: Client | None = None
        self.upstream: Upstream | None = None
        self.gateway: Gateway | None = None
        self._runner: web.AppRunner | None = None
        self._keep_alive: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "GatewayServer":
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _start(self) -> None:
        s = self.settings
        keys = self.keys if self.keys is not None else Keys.load(s.openai_keys_file)
        host = self.host
        if not keys and not is_loopback(host):
            log.warning("no API keys configured (openai_keys_file, LAMABUS_OPENAI_KEYS): the OpenAI gateway "
                        "listens on loopback only (%s instead of %s)", LOOPBACK, host)
            host = LOOPBACK
        login = {} if self.credentials is None else {"credentials": self.credentials}
        self.nc = await connect(self.nats_url, name="lamabus-openai", **login)
        self.upstream = Upstream(self.nc, s.prefix)
        self.gateway = Gateway(self.upstream, keys, max_concurrent=s.openai_max_concurrent)
        if s.keep_alive > 0:
            # A handle keeps its model loaded on its node: released after the service's keep_alive unused.
            self._keep_alive = asyncio.create_task(self.upstream.keep_alive(s.keep_alive))
        # handler_cancellation: a client that hangs up cancels its handler, and so its generation.
        runner = web.AppRunner(self.gateway.app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        self._runner = runner
        sock = listen(host, self.port, what="the OpenAI gateway")
        await web.SockSite(runner, sock).start()
        self.port = sock.getsockname()[1]
        self.url = http_url(sock, "").rstrip("/")
        if self.url_file is not None:
            self.url_file.parent.mkdir(parents=True, exist_ok=True)
            self.url_file.write_text(f"{self.url}\n")
        auth = f"{len(keys)} API keys" if keys else "no API keys: loopback only, no authentication"
        log.info("OpenAI-compatible API on %s/v1 (%s; lamabus at %s)", self.url, auth, self.nats_url)

    async def aclose(self) -> None:
        keep_alive, self._keep_alive = self._keep_alive, None
        if keep_alive is not None:
            # Its loop ends only by its cancel: one swallowed would make a plain await of it wait for ever.
            await stop_task(keep_alive, timeout=STOP_TIMEOUT, what="the gateway's keep-alive", log=log)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self.upstream is not None:
            await self.upstream.aclose()
            self.upstream = None
        nc, self.nc = self.nc, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.drain()
            except Exception:
                await nc.close()
        if self.url_file is not None:
            self.url_file.unlink(missing_ok=True)

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


def gateway_server_for(settings: Settings, nats_url: str, *, address: tuple[str, int] | None = None,
                       credentials: Any = None) -> GatewayServer | None:
    """The gateway ``settings.openai`` asks for (``address`` overrides it), or None when it is off."""
    address = address or settings.openai_address
    if address is None:
        return None
    return GatewayServer(settings, nats_url, *address, url_file=settings.openai_url_file, credentials=credentials)


async def run_gateway(settings: Settings, nats_url: str, credentials: Any = None) -> None:
    """``lamabus gateway``: the gateway alone, until SIGINT/SIGTERM."""
    address = settings.openai_address or parse_address(DEFAULT_GATEWAY_ADDRESS)
    server = gateway_server_for(settings, nats_url, address=address, credentials=credentials)
    assert server is not None
    # Signals are taken before the start, so one that comes while the broker is still being reached
    # abandons the start instead of waiting for it (as serve does).
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, anyio.CancelScope() as scope:
        stop = anyio.Event()

        async def watch() -> None:
            async for signum in signals:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                stop.set()
                if server.url is None:
                    scope.cancel()
                return

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with server:
                log.info("lamabus gateway ready on %s", server.url)
                await stop.wait()
            tg.cancel_scope.cancel()
