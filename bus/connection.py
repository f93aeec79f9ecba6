"""Connecting to NATS the way a long-running service should: reconnect forever,
survive any subject a peer publishes, and notice a client that stopped reading."""

from __future__ import annotations

import logging
from typing import Any

import anyio
from nats.aio.client import Client

log = logging.getLogger("lamabus.bus")


class TolerantClient(Client):
    """nats-py's client, except that a subject or reply that is not UTF-8 is decoded with
    replacement characters instead of raising.

    nats-py 2.16 decodes them strictly inside its read loop; the ``UnicodeDecodeError``
    ends that loop while the client still reports itself connected, so one peer that
    publishes ``lama.topic.bad\\xff.cancel`` would leave every subscription of the
    process deaf (reported upstream as a bug). With replacement characters the message
    arrives, its topic token is not a valid topic id, and it gets the usual coded answer.
    """

    def _build_message(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> Any:
        return self.msg_class(subject=subject.decode(errors="replace"), reply=reply.decode(errors="replace"),
                              data=data, headers=headers, _client=self, _sid=sid)


async def connect(url: str, *, name: str = "lamabus", reconnect_forever: bool = True) -> Client:
    nc = TolerantClient()

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


async def wait_until_deaf(nc: Client, *, interval: float = 5.0, timeout: float = 5.0, misses: int = 3) -> None:
    """Return once ``nc`` claims to be connected but has stopped reading from the server.

    A round trip (PING, answered by PONG through the client's own read loop) that
    fails ``misses`` times in a row while the client says it is connected means the
    read loop is gone: nothing the client subscribed to will ever be delivered again.
    While the client is reconnecting, nats-py is already on it, so that does not count.
    """
    missed = 0
    while True:
        await anyio.sleep(interval)
        if not nc.is_connected:
            missed = 0
            continue
        try:
            await nc.flush(timeout=timeout)
        except Exception as exc:
            if not nc.is_connected:
                missed = 0
                continue
            missed += 1
            log.warning("no answer from the broker to a round trip (%d of %d): %s", missed, misses,
                        exc or type(exc).__name__)
            if missed >= misses:
                return
        else:
            missed = 0
