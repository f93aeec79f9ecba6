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

    # ``nats://a:4222,nats://b:4222``: the servers of a cluster, tried in the order given (the client also
    # learns the others from the server it reaches).
    servers = [u.strip() for u in url.split(",") if u.strip()]
    await nc.connect(
        servers,
        name=name,
        dont_randomize=True,
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

    Every ``interval`` the client sends a message to a subject only it subscribes to; if
    that echo does not come back through its own read loop ``misses`` times in a row
    while the client says it is connected, the read loop is gone and nothing it
    subscribed to will be delivered again. (``flush`` cannot tell: nats-py answers it
    without a round trip once its read loop has ended.) While the client is
    reconnecting, nats-py is already on it, so that does not count.
    """
    echoed = anyio.Event()

    async def on_echo(_msg: Any) -> None:
        echoed.set()

    subject = nc.new_inbox()
    sub = await nc.subscribe(subject, cb=on_echo)
    try:
        missed = 0
        while True:
            await anyio.sleep(interval)
            if not nc.is_connected:
                missed = 0
                continue
            echoed = anyio.Event()
            try:
                await nc.publish(subject, b"")
            except Exception:  # disconnected in between: nats-py reconnects
                continue
            with anyio.move_on_after(timeout):
                await echoed.wait()
            if echoed.is_set() or not nc.is_connected:
                missed = 0
                continue
            missed += 1
            log.warning("the broker's echo did not come back (%d of %d)", missed, misses)
            if missed >= misses:
                return
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await sub.unsubscribe()
            except Exception:
                pass
