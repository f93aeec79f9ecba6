"""A few hundred hostile payloads of every kind against a real service (issue 16).

Each must get a structured answer (a ``message.rejected``, a coded error reply, a normal
reply) or be deliberately ignored (an AI author); afterwards the service is alive and a
normal message still gets its reply. Payloads come from tests/hostile.py (shared with
``python -m bench.soak``).
"""

from __future__ import annotations

import collections
import random
import time

import anyio
import msgspec
import pytest

from bus.node.intake import CONSUMER
from bench.hostile import RawPublisher, api_payloads, cancel_payloads, topic_payloads
from wire.errors import ErrorCode
from wire.messages import CancelReply, GenerationCompleted, MessageRejected, decode_topic_event
from wire.params import GenerationParams

pytestmark = pytest.mark.model


async def _until(condition, *, timeout: float, what: str) -> None:
    """Poll ``condition`` (the state lives in another process or task) until it holds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.05)


async def test_hostile_payloads_each_get_an_answer_and_the_service_lives(service, client):
    nc, prefix = client.nc, service.settings.prefix
    rng = random.Random(16)
    active = await service.registry.active_model()
    topic_items = topic_payloads(prefix, active.person_id, rng=rng, count=216)
    cancel_items = cancel_payloads(prefix, rng=rng, count=48)
    api_items = api_payloads(prefix, rng=rng, count=40)
    expected = collections.Counter(h.expect for h in topic_items)

    rejected: list[MessageRejected] = []
    completed: list[GenerationCompleted] = []

    async def on_event(msg) -> None:
        try:
            event = decode_topic_event(msg.data)
        except Exception:
            return
        if isinstance(event, MessageRejected):
            rejected.append(event)
        elif isinstance(event, GenerationCompleted):
            completed.append(event)

    replies: dict[str, msgspec.Raw] = {}

    async def on_reply(msg) -> None:
        replies[msg.subject] = msg

    await nc.subscribe(f"{prefix}.topic.*.evt", cb=on_event)
    await nc.subscribe(f"{prefix}.rejected", cb=on_event)
    await nc.subscribe("_HOSTILE.>", cb=on_reply)
    await nc.flush()

    async with RawPublisher(service.url) as raw:
        for h in topic_items:
            raw.publish(h.subject, h.data)
        for i, h in enumerate([*cancel_items, *api_items]):
            raw.publish(h.subject, h.data, reply=f"_HOSTILE.{i}".encode())
        await raw.flush()

    js = client.js
    stream = service.subjects.stream_name

    async def all_taken() -> bool:
        info = await js.consumer_info(stream, CONSUMER)
        return info.num_pending == 0 and info.num_ack_pending == 0

    await _until(all_taken, timeout=240, what="the intake to settle every message")
    try:
        await _until(lambda: _ready(len(rejected) >= expected["rejected"] and len(completed) >= expected["answered"]),
                     timeout=30, what="every rejection and answer")
    except AssertionError:
        got = collections.Counter((r.topic[:20], r.error.message[:60]) for r in rejected)
        raise AssertionError(f"{len(rejected)}/{expected['rejected']} rejected, {len(completed)}/{expected['answered']} "
                             f"answered, intake {service.intake.rejected}; {got}") from None
    await _until(lambda: _ready(len(replies) == len(cancel_items) + len(api_items)), timeout=30,
                 what="a reply to every cancel and API request")

    # Exactly one structured answer per payload, nothing silently dropped.
    assert len(rejected) == expected["rejected"], collections.Counter(r.error.code for r in rejected)
    assert all(r.error.code is ErrorCode.BAD_REQUEST for r in rejected)
    assert len(completed) == expected["answered"]
    # The AI's own replies come back through the intake too, and are ignored the same way.
    assert service.assistant.counters["ignored_ai"] == expected["ignored"] + expected["answered"]
    assert service.intake.rejected == expected["rejected"]

    for i, h in enumerate(cancel_items):
        msg = replies[f"_HOSTILE.{i}"]
        if h.kind == "valid":
            assert msgspec.json.decode(msg.data, type=CancelReply).topic == "hostile"
        else:  # a coded error, never an internal one
            assert (msg.headers or {}).get("Nats-Service-Error-Code") == "400", (h.kind, msg.headers, msg.data)
    for i, h in enumerate(api_items, start=len(cancel_items)):
        msg = replies[f"_HOSTILE.{i}"]
        assert (msg.headers or {}).get("Nats-Service-Error-Code") == "400", (h.subject, msg.headers, msg.data)

    # Alive: the micro service answers PING, and a person still gets a reply.
    ping = await nc.request("$SRV.PING.lamabus", b"", timeout=5)
    assert msgspec.json.decode(ping.data)["name"] == "lamabus"
    items = [i async for i in client.ask("after-hostile", "Hello", params=GenerationParams(max_tokens=4, temperature=0))]
    assert isinstance(items[-1], GenerationCompleted)


async def _ready(value: bool) -> bool:
    return value
