"""The assistant's Publisher port on NATS: tokens on core NATS, the rest on JetStream."""

from __future__ import annotations

from nats.aio.client import Client
from nats.js import JetStreamContext

from bus.subjects import Subjects
from wire.messages import ChatMessage, GenerationToken, TopicEvent, encode

MSG_ID = "Nats-Msg-Id"


class NatsPublisher:
    def __init__(self, nc: Client, js: JetStreamContext, subjects: Subjects) -> None:
        self.nc = nc
        self.js = js
        self.subjects = subjects

    async def token(self, token: GenerationToken) -> None:
        # Ephemeral by design: a missed token is recovered from generation.completed.
        await self.nc.publish(self.subjects.tok(token.topic), encode(token))

    async def event(self, event: TopicEvent, *, dedup_id: str) -> None:
        await self.js.publish(self.subjects.evt(event.topic), encode(event), headers={MSG_ID: dedup_id})

    async def message(self, message: ChatMessage) -> None:
        await self.js.publish(self.subjects.msg(message.topic), encode(message), headers={MSG_ID: message.id})
