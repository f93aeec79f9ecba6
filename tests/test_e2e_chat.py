"""The whole loop on a real nats-server with the real bundled model."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import msgspec
import pytest

from wire.api import DiagnosticsGet
from wire.errors import ErrorCode, LamaError
from wire.identity import person_id_for
from wire.messages import (
    ChatMessage,
    GenerationCompleted,
    GenerationStarted,
    GenerationToken,
    MessageRejected,
    decode_topic_event,
    encode,
)
from wire.params import GenerationParams

pytestmark = pytest.mark.model

GREEDY = GenerationParams(temperature=0.0, max_tokens=24, seed=1)


async def test_message_gets_streamed_reply_under_ai_identity(service, client):
    topic = "demo"
    js = client.nc.jetstream()
    items = [item async for item in client.ask(topic, "Say hello.", params=GREEDY)]
    started, *tokens, completed = items
    assert isinstance(started, GenerationStarted)
    assert all(isinstance(t, GenerationToken) for t in tokens)
    assert isinstance(completed, GenerationCompleted)
    active = await service.registry.active_model()
    assert active is not None and completed.model_id == active.id
    assert completed.author_id == active.person_id == person_id_for(active.id)
    assert [t.seq for t in tokens] == list(range(len(tokens)))
    assert "".join(t.text for t in tokens if t.channel == "content") == completed.text
    assert completed.text.strip()
    assert completed.finish_reason in ("stop", "length", "stop_sequence")
    assert completed.tokens >= len(tokens) > 0
    assert completed.usage.completion_tokens == completed.tokens
    assert completed.usage.prompt_tokens > 0
    assert completed.timing.time_to_first_token > 0 and completed.timing.tokens_per_second > 0
    # The reply is a durable chat.message on the topic, authored by the AI and replying to ours.
    stream = service.subjects.stream_name
    reply_raw = await js.get_last_msg(stream, service.subjects.msg(topic))
    reply = decode_topic_event(reply_raw.data)
    assert isinstance(reply, ChatMessage)
    assert reply.author_id == active.person_id and reply.reply_to == completed.request_id
    assert reply.id == completed.message_id and reply.text == completed.text
    evt_raw = await js.get_last_msg(stream, service.subjects.evt(topic))
    assert decode_topic_event(evt_raw.data) == completed


async def test_greedy_reply_is_deterministic_and_follows_conversation(service, client):
    async def answer(topic: str, text: str) -> str:
        items = [i async for i in client.ask(topic, text, params=GREEDY)]
        return items[-1].text

    first = await answer("det-a", "What is the capital of France?")
    second = await answer("det-b", "What is the capital of France?")
    assert first == second
    history = await service.registry.history("det-a")
    assert [t.is_ai for t in history] == [False, True]


async def test_ai_authored_message_is_never_answered(service, client):
    active = await service.registry.active_model()
    ai_message = ChatMessage(id=str(uuid.uuid4()), topic="quiet", author_id=active.person_id, text="I am the AI",
                             sent_at=datetime.now(timezone.utc))
    await client.post(ai_message)
    # A person's message after it is answered; had the AI message been answered, its
    # events would come first in the topic's single lane.
    items = [i async for i in client.ask("quiet", "Hi", params=GREEDY)]
    assert isinstance(items[-1], GenerationCompleted)
    assert not await service.registry.has_replied("quiet", ai_message.id)
    assert service.assistant.counters["ignored_ai"] >= 1


async def test_malformed_payload_is_rejected_with_reason(service, client):
    sub = await client.nc.subscribe(service.subjects.evt("bad"))
    await client.js.publish(service.subjects.msg("bad"), b'{"type":"chat.message","id":"x1","topic":"bad"}')
    msg = await sub.next_msg(timeout=10)
    rejected = decode_topic_event(msg.data)
    assert isinstance(rejected, MessageRejected)
    assert rejected.error.code == ErrorCode.BAD_REQUEST and rejected.message_id == "x1"
    assert "authorId" in rejected.error.message


async def test_invalid_topic_token_is_rejected(service, client):
    sub = await client.nc.subscribe("lama.topic.has@sign.evt")
    message = ChatMessage(id="y1", topic="demo", author_id="u", text="hi", sent_at=datetime.now(timezone.utc))
    await client.js.publish("lama.topic.has@sign.msg", encode(message))
    rejected = decode_topic_event((await sub.next_msg(timeout=10)).data)
    assert isinstance(rejected, MessageRejected) and "invalid topic id" in rejected.error.message


async def test_unknown_model_fails_with_model_not_found(service, client):
    with pytest.raises(LamaError) as info:
        async for _ in client.ask("demo", "hi", model_id="no-such-model"):
            pass
    assert info.value.code == ErrorCode.MODEL_NOT_FOUND


async def test_micro_service_answers_ping_and_diagnostics(service, client):
    ping = await client.nc.request("$SRV.PING.lamabus", b"", timeout=5)
    assert msgspec.json.decode(ping.data)["name"] == "lamabus"
    diag = await client.call(DiagnosticsGet())
    assert diag.registry.active_model_id


async def test_rejection_names_the_missing_field(service, client):
    sub = await client.nc.subscribe(service.subjects.evt("fields"))
    await client.js.publish(service.subjects.msg("fields"),
                            b'{"type":"chat.message","id":"f1","topic":"fields","text":"x","sentAt":"2026-01-01T00:00:00Z"}')
    rejected = decode_topic_event((await sub.next_msg(timeout=10)).data)
    assert isinstance(rejected, MessageRejected) and rejected.error.details == {"field": "$.authorId"}
