"""``/metrics`` over HTTP (aiohttp), for ``--metrics HOST:PORT``; the figures are :mod:`handlers.metrics`.

The same text is answered on ``<prefix>.api.metrics`` (bus/node/api.py) for nodes
that open no HTTP port. A taken port is replaced by a free one, as the chat
page does; the bound URL is written to ``<data-dir>/metrics.url``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType

from aiohttp import web

from bus.config import Settings
from bus.web.listen import http_url, listen
from handlers.metrics import ServiceMetrics

log = logging.getLogger("lamabus.metrics")


class MetricsServer:
    """``async with MetricsServer("127.0.0.1", 0, metrics) as m: m.url`` -> ``http://127.0.0.1:PORT/metrics``."""

    def __init__(self, host: str, port: int, metrics: ServiceMetrics, *, url_file: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.url_file = url_file
        self.url: str | None = None
        self._runner: web.AppRunner | None = None

    async def _get(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.exposition(request.headers.get("Accept"))
        response = web.Response(body=body, headers={"Cache-Control": "no-store"})
        response.headers["Content-Type"] = content_type  # has a version parameter aiohttp's content_type refuses
        return response

    async def __aenter__(self) -> "MetricsServer":
        app = web.Application()
        app.router.add_get("/metrics", self._get)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runner = runner
        try:
            sock = listen(self.host, self.port, what="/metrics", backlog=64)
            await web.SockSite(runner, sock).start()
        except BaseException:
            await self.aclose()
            raise
        self.port = sock.getsockname()[1]
        self.url = http_url(sock, "/metrics")
        if self.url_file is not None:
            self.url_file.write_text(f"{self.url}\n")
        log.info("metrics on %s", self.url)
        return self

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self.url_file is not None:
            self.url_file.unlink(missing_ok=True)

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


def metrics_for(settings: Settings) -> tuple[ServiceMetrics | None, MetricsServer | None]:
    """The service's metrics (None when ``metrics`` is ``off``) and its HTTP server (None unless an address is set)."""
    if settings.metrics == "off":
        return None, None
    metrics = ServiceMetrics()
    address = settings.metrics_address
    if address is None:
        return metrics, None
    return metrics, MetricsServer(*address, metrics, url_file=settings.metrics_url_file)
