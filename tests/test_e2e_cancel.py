"""Cancel over the bus (``<prefix>.topic.<topic>.cancel``) with the real bundled model."""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime, timezone

import anyio
import pytest

from bus.client import raise_for_error
from bus.replay.command import records
from wire.errors import ErrorCode, LamaError
from wire.messages import (
    ChatMessage,
    GenerationCancelled,
    GenerationCompleted,
    GenerationStarted,
    GenerationToken,
    decode_topic_event,
    encode,
)
from wire.params import GenerationParams

pytestmark = pytest.mark.model

#: Long enough that it is still running when the cancel lands; no stop sequence to end it early.
LONG = GenerationParams(temperature=0.0, max_tokens=400, seed=1, stop=[])
SHORT = GenerationParams(temperature=0.0, max_tokens=12, seed=1)
PROMPT = "Count from 1 to 300, separated by commas."


async def stored(client, topic: str) -> list:
    async with contextlib.aclosing(records(client.js, topic, prefix=client.subjects.prefix)) as recs:
        return [r.event async for r in recs]


async def test_cancel_running_generation_keeps_partial_text_and_posts_no_reply(service, client):
    topic = "cancel-run"
    mid = str(uuid.uuid4())
    tokens: list[GenerationToken] = []
    end = None
    reply = None
    with anyio.fail_after(60):
        async with contextlib.aclosing(client.ask(topic, PROMPT, params=LONG, message_id=mid)) as items:
            async for item in items:
                if isinstance(item, GenerationToken):
                    tokens.append(item)
                    if reply is None:
                        reply = await client.cancel(topic, mid)
                elif isinstance(item, (GenerationCompleted, GenerationCancelled)):
                    end = item
    assert reply is not None and reply.cancelled and reply.request_id == mid and reply.topic == topic
    assert isinstance(end, GenerationCancelled), end
    assert end.request_id == mid and end.author_id == tokens[0].author_id
    streamed = "".join(t.text for t in tokens if t.channel == "content")
    assert end.text and streamed.startswith(end.text), (end.text, streamed)
    assert 0 < end.tokens < LONG.max_tokens
    assert [t.seq for t in tokens] == list(range(len(tokens)))
    # Nothing was answered: no reply chat.message in the log, the cancellation is there.
    events = await stored(client, topic)
    assert not [e for e in events if isinstance(e, ChatMessage) and e.reply_to == mid]
    assert [e for e in events if isinstance(e, GenerationCancelled)] == [end]
    assert not await service.registry.has_replied(topic, mid)
    # The topic goes on: the next message is answered (the cancelled turn left out of the history).
    items = [i async for i in client.ask(topic, "Say hi.", params=SHORT)]
    assert isinstance(items[-1], GenerationCompleted) and items[-1].text


async def test_cancel_a_queued_message_then_the_running_one(service, client):
    topic = "cancel-queue"
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    sub = await client.nc.subscribe(client.subjects.evt(topic))
    tok = await client.nc.subscribe(client.subjects.tok(topic))
    await client.nc.flush()
    for mid in (first, second):
        await client.post(ChatMessage(id=mid, topic=topic, author_id="u", text=PROMPT,
                                      sent_at=datetime.now(timezone.utc), params=LONG))
    with anyio.fail_after(60):
        started: set[str] = set()
        while started != {first, second}:
            event = decode_topic_event((await sub.next_msg(timeout=30)).data)
            if isinstance(event, GenerationStarted):
                started.add(event.request_id)
        token = decode_topic_event((await tok.next_msg(timeout=30)).data)
        assert isinstance(token, GenerationToken) and token.request_id == first
        queued = await client.cancel(topic, second)
        assert queued.cancelled and queued.request_id == second
        running = await client.cancel(topic)  # whatever runs in the topic
        assert running.cancelled and running.request_id == first
        ends: list = []
        while len(ends) < 2:
            event = decode_topic_event((await sub.next_msg(timeout=30)).data)
            if isinstance(event, (GenerationCancelled, GenerationCompleted)):
                ends.append(event)
    await sub.unsubscribe()
    await tok.unsubscribe()
    assert [type(e) for e in ends] == [GenerationCancelled, GenerationCancelled]
    assert [e.request_id for e in ends] == [first, second]  # the topic's order
    assert ends[0].text and ends[0].tokens > 0
    assert ends[1].text == "" and ends[1].tokens == 0  # never started
    events = await stored(client, topic)
    assert not [e for e in events if isinstance(e, ChatMessage) and e.reply_to is not None]


@pytest.mark.parametrize("payload", [b"not json", b'{"topic": 5}', b"{}", b'{"type":"chat.message","topic":"demo"}',
                                     encode({"topic": "other"})])
async def test_bad_cancel_payload_gets_a_bad_request_error(service, client, payload):
    reply = await client.nc.request(client.subjects.cancel("demo"), payload, timeout=5)
    assert reply.headers and reply.headers.get("Nats-Service-Error-Code") == "400"
    with pytest.raises(LamaError) as info:
        raise_for_error(reply)
    assert info.value.code == ErrorCode.BAD_REQUEST


async def test_cancel_in_an_idle_topic_cancels_nothing(service, client):
    reply = await client.cancel("idle-topic")
    assert not reply.cancelled and reply.topic == "idle-topic" and reply.request_id is None
    reply = await client.cancel("idle-topic", "no-such-message")
    assert not reply.cancelled and reply.request_id == "no-such-message"
