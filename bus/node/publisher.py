"""The assistant's Publisher port on NATS: tokens on core NATS, the rest on JetStream."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client
from nats.js import JetStreamContext

from bus.subjects import Subjects
from wire.messages import ChatMessage, GenerationToken, TopicEvent, encode

MSG_ID = "Nats-Msg-Id"

log = logging.getLogger("lamabus.publisher")


def _log_failed_ack(ack: "asyncio.Future[object]") -> None:
    if not ack.cancelled() and ack.exception() is not None:
        log.warning("JetStream did not acknowledge an event: %s", ack.exception())


class NatsPublisher:
    def __init__(self, nc: Client, js: JetStreamContext, subjects: Subjects) -> None:
        self.nc = nc
        self.js = js
        self.subjects = subjects

    async def token(self, token: GenerationToken) -> None:
        # Ephemeral by design: a missed token is recovered from generation.completed.
        await self.nc.publish(self.subjects.tok(token.topic), encode(token))

    async def event(self, event: TopicEvent, *, dedup_id: str, wait: bool = True) -> None:
        subject, data, headers = self.subjects.evt(event.topic), encode(event), {MSG_ID: dedup_id}
        if wait:
            await self.js.publish(subject, data, headers=headers)
            return
        # On the wire now, in order with what follows on this connection; the broker's ack is
        # only checked when it comes, so the caller does not wait a round trip for it.
        ack = await self.js.publish_async(subject, data, headers=headers)
        ack.add_done_callback(_log_failed_ack)

    async def message(self, message: ChatMessage) -> None:
        await self.js.publish(self.subjects.msg(message.topic), encode(message), headers={MSG_ID: message.id})
