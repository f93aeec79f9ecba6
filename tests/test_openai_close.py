"""Closing the OpenAI gateway (bus/gateway/server.py) on a real nats-server, with no service and no model behind
it: the keep-alive task, whose loop ends only by its cancel, cannot hold a close up for ever."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import anyio
import pytest

from bus.config import Settings
from bus.gateway import server as gateway_server
from bus.gateway.auth import Keys
from bus.gateway.server import GatewayServer
from bus.gateway.upstream import Upstream
from tests.stubborn import SwallowsCancels


def _server(tmp_path: Path, nats_url: str) -> GatewayServer:
    settings = Settings(nats_url=nats_url, data_dir=str(tmp_path / "data"), keep_alive=60.0)
    return GatewayServer(settings, nats_url, "127.0.0.1", 0, keys=Keys())


@contextlib.asynccontextmanager
async def _started(server: GatewayServer) -> Any:
    await server.__aenter__()
    try:
        yield server
    finally:
        with anyio.fail_after(30):
            await server.aclose()  # idempotent: closes what a close the test cut short left open


async def test_a_close_ends_a_keep_alive_that_swallowed_its_cancel(tmp_path: Path, nats_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture):
    """A cancel lost once (3.11's wait_for returns a reply that meets it; nats-py drops some) and the loop went on
    for ever while the close awaited it. The close now cancels again while it runs, so it ends at once."""
    running, swallowed = asyncio.Event(), asyncio.Event()
    keep_alive = Upstream.keep_alive

    async def swallows_one_cancel(self: Upstream, idle: float) -> None:
        running.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()
        await keep_alive(self, idle)  # the real loop, as if nothing had happened

    monkeypatch.setattr(Upstream, "keep_alive", swallows_one_cancel)
    async with _started(_server(tmp_path, nats_url)) as server:
        task = server._keep_alive
        assert task is not None
        with anyio.fail_after(10):
            await running.wait()
            await server.aclose()
        assert swallowed.is_set() and task.cancelled()
    assert not [r for r in caplog.records if "did not stop" in r.getMessage()]


async def test_a_close_is_bounded_even_when_keep_alive_never_stops(tmp_path: Path, nats_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr(gateway_server, "STOP_TIMEOUT", 0.5)
    keep_alive = SwallowsCancels()
    monkeypatch.setattr(Upstream, "keep_alive", keep_alive.swallow_cancels)
    async with _started(_server(tmp_path, nats_url)) as server:
        stubborn = server._keep_alive
        assert stubborn is not None
        with anyio.fail_after(10):
            await keep_alive.running.wait()
        # In a task of its own, so that a close that does wait for ever fails this test rather than hanging it.
        closing = asyncio.create_task(server.aclose())
        try:
            with anyio.move_on_after(10):
                await asyncio.shield(closing)
            assert closing.done() and not stubborn.done()
        finally:
            keep_alive.release.set()
            with anyio.fail_after(10):
                await closing
                await stubborn
    assert keep_alive.cancels > 1  # cancelled again while it ran on
    assert any("did not stop within" in r.getMessage() and "swallow_cancels" in r.getMessage()
               for r in caplog.records)
