"""Connecting to NATS the way a long-running service should: reconnect forever."""

from __future__ import annotations

import logging

from nats.aio.client import Client

log = logging.getLogger("lamabus.bus")


async def connect(url: str, *, name: str = "lamabus", reconnect_forever: bool = True) -> Client:
    nc = Client()

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):  # our own close is no news
            log.warning("disconnected from %s; reconnecting", url)

    async def on_reconnect() -> None:
        log.info("reconnected to %s", url)

    async def on_error(exc: Exception) -> None:
        # A client that gives up after a few tries reports the failure itself, once.
        log.log(logging.WARNING if reconnect_forever else logging.DEBUG, "nats error: %s", exc)

    await nc.connect(
        url,
        name=name,
        max_reconnect_attempts=-1 if reconnect_forever else 3,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
    )
    return nc
