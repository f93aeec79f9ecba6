"""A peer's non-UTF-8 subject must not leave lamabus deaf, and a deaf client is noticed (issue 16)."""

from __future__ import annotations

import anyio
from nats.aio.client import Client

from bus.broker.connection import connect, wait_until_deaf
from bench.hostile import RawPublisher


async def _poison(url: str, subject: bytes) -> None:
    async with RawPublisher(url) as raw:
        raw.publish(subject, b"{}")
        await raw.flush()


async def test_plain_nats_py_goes_deaf_on_a_non_utf8_subject_and_the_watch_notices(nats_url):
    # The upstream behaviour the watch exists for: the read loop dies, the client still says connected.
    nc = Client()
    await nc.connect(nats_url, allow_reconnect=False)
    try:
        async def ignore(msg) -> None:
            pass

        await nc.subscribe("poison.*", cb=ignore)
        await nc.flush()
        await _poison(nats_url, b"poison.bad\xff\xfe")
        with anyio.fail_after(20):
            await wait_until_deaf(nc, interval=0.2, timeout=0.5, misses=2)
        assert nc.is_connected  # which is why only a round trip can tell
    finally:
        await nc.close()


async def test_our_client_reads_on_after_a_non_utf8_subject(nats_url):
    nc = await connect(nats_url)
    got: list[str] = []
    arrived = anyio.Event()

    async def on_msg(msg) -> None:
        got.append(msg.subject)
        if len(got) == 2:
            arrived.set()

    try:
        await nc.subscribe("poison.*", cb=on_msg)
        await nc.flush()
        await _poison(nats_url, b"poison.bad\xff\xfe")
        await nc.publish("poison.good", b"{}")
        with anyio.fail_after(10):
            await arrived.wait()
        assert got == ["poison.bad\ufffd\ufffd", "poison.good"]
        with anyio.move_on_after(1.5) as scope:  # several round trips, all answered
            await wait_until_deaf(nc, interval=0.2, timeout=0.5, misses=2)
        assert scope.cancelled_caught, "a reading client must not be reported deaf"
    finally:
        await nc.close()
