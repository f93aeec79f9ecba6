"""A topic's replies stay in posting order when recording or publishing one of them fails.

The assistant answers a topic's messages one after the other in its lane; when
the last step of an answer (recording the reply, publishing it) raises, it hands
the message back to the broker and the lane goes on with the next message. A
JetStream leader election makes exactly that step fail for a second or two, so
without more the next message's reply is published before the earlier one,
which comes round again only after the redelivery delay.

Two parts, both around the assistant's ports (handlers/ stays free of NATS):

* :class:`RetryingPublisher` retries a durable publish (a reply, a topic event)
  with backoff for a bounded time, well inside ``ack_wait``, before it gives up.
  Every publish carries its de-duplication id, so a retry of a publish that did
  reach the broker stores nothing twice. While it retries, the job is still the
  lane's current one, so the assistant's progress acks keep the message alive.
  (Recording is retried through elections by the event store itself, within its
  own bounded timeout.)
* :class:`LaneOrder` holds a topic back once one of its messages was handed
  back anyway: until that message is settled (answered, failed or cancelled:
  acked), every other message of the topic is handed back too, and so answered
  only after it. It sits on the submit path (messages the intake takes) and on
  the directory look-up that starts every answer (messages already queued in
  the lane behind the one handed back).
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable, Sequence

import anyio

from engine.types import ChatTurn
from handlers.assistant import Delivery
from handlers.ports import Directory, HandBack, ModelRef, Publisher, RecordedReply
from wire.messages import ChatMessage, GenerationCompleted, GenerationToken, TopicEvent

log = logging.getLogger("lamabus.lane_order")

Submit = Callable[[ChatMessage, Delivery], Awaitable[None]]


def retry_budget(ack_wait: float) -> float:
    """How long one publish is retried: an election takes a second or two; half of ack_wait at most."""
    return min(4.0, ack_wait / 2)


class RetryingPublisher:
    """A :class:`~handlers.ports.Publisher` whose durable publishes are retried for ``budget`` seconds."""

    def __init__(self, inner: Publisher, *, budget: float, first_delay: float = 0.1, max_delay: float = 1.0) -> None:
        self.inner = inner
        self.budget = budget
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.retries = 0

    async def token(self, token: GenerationToken) -> None:
        await self.inner.token(token)  # ephemeral: a lost token is recovered from generation.completed

    async def event(self, event: TopicEvent, *, dedup_id: str, wait: bool = True) -> None:
        if not wait:  # fire-and-forget by the caller's choice: nothing to retry on
            await self.inner.event(event, dedup_id=dedup_id, wait=False)
            return
        await self._retrying(lambda: self.inner.event(event, dedup_id=dedup_id, wait=True), dedup_id)

    async def message(self, message: ChatMessage) -> None:
        await self._retrying(lambda: self.inner.message(message), message.id)

    async def _retrying(self, publish: Callable[[], Awaitable[None]], what: str) -> None:
        deadline = time.monotonic() + self.budget
        delay = self.first_delay
        while True:
            left = deadline - time.monotonic()
            try:
                # One attempt may not outlast the budget (nats-py waits 5 s for a JetStream ack by default).
                with anyio.fail_after(max(0.05, left)):
                    await publish()
                return
            except Exception as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                self.retries += 1
                log.info("publishing %s failed (%s: %s); again in %.1fs", what, type(exc).__name__, exc, delay)
                await anyio.sleep(min(delay, left))
                delay = min(self.max_delay, delay * 2)


class LaneHeld(HandBack):
    """The topic waits for an earlier message that was handed back; this one is handed back after it."""


class LaneOrder:
    """Which topics wait for a message handed back, and which message each waits for.

    A hold ends when that message is acked here, when this node stops owning the topic, or after
    ``max_hold`` seconds (a message that never comes back): order is then no longer this node's to keep.
    Not when the registry shows the message answered: a reply recorded and not yet published is
    exactly the case a hold is for.
    """

    def __init__(self, *, max_hold: float = 60.0) -> None:
        self.max_hold = max_hold
        self._held: dict[str, tuple[str, float]] = {}
        self.held_back = 0

    def held(self) -> dict[str, str]:
        return {topic: message_id for topic, (message_id, _) in self._held.items()}

    def stats(self) -> dict[str, object]:
        return {"held": self.held(), "heldBack": self.held_back}

    def handed_back(self, topic: str, message_id: str) -> None:
        if topic not in self._held:
            self._held[topic] = (message_id, time.monotonic())
            log.info("topic %s waits for message %s, handed back", topic, message_id)

    def settled(self, topic: str, message_id: str) -> None:
        if (held := self._held.get(topic)) is not None and held[0] == message_id:
            del self._held[topic]

    def release(self, keep: Callable[[str], bool]) -> None:
        """End the holds on the topics for which ``keep(topic)`` is false (e.g. a partition given away)."""
        for topic in [t for t in self._held if not keep(t)]:
            del self._held[topic]

    def check(self, topic: str, message_id: str) -> None:
        """Raise :class:`LaneHeld` when ``message_id`` must wait for an earlier message of ``topic``."""
        held = self._held.get(topic)
        if held is None or held[0] == message_id:
            return
        if time.monotonic() - held[1] > self.max_hold:
            del self._held[topic]
            return
        self.held_back += 1
        raise LaneHeld(f"topic {topic}: message {message_id} waits for {held[0]}, handed back before it")

    # -- where it plugs in

    def submit(self, inner: Submit) -> Submit:
        """The intake's submit: holds a message back, and tracks how each delivery is settled."""

        async def submit(message: ChatMessage, delivery: Delivery) -> None:
            tracked = _TrackedDelivery(delivery, self, message)
            try:
                self.check(message.topic, message.id)
            except LaneHeld:
                await delivery.retry_later()  # quietly: nothing failed, it only waits its turn
                return
            try:
                await inner(message, tracked)
            except BaseException:
                # Not queued after all (its started event could not be sent): the broker brings it back,
                # and the topic's later messages wait for it.
                self.handed_back(message.topic, message.id)
                raise

        return submit


class _TrackedDelivery:
    def __init__(self, inner: Delivery, order: LaneOrder, message: ChatMessage) -> None:
        self._inner = inner
        self._order = order
        self._topic = message.topic
        self._id = message.id

    @property
    def redelivered(self) -> bool:
        return self._inner.redelivered

    async def ack(self) -> None:
        await self._inner.ack()
        self._order.settled(self._topic, self._id)

    async def in_progress(self) -> None:
        await self._inner.in_progress()

    async def retry_later(self) -> None:
        self._order.handed_back(self._topic, self._id)
        await self._inner.retry_later()


class OrderedDirectory:
    """The assistant's :class:`~handlers.ports.Directory` with the lane gate on ``recorded_reply``, the
    first thing the assistant asks about a message both when it takes it and when its turn comes."""

    def __init__(self, inner: Directory, order: LaneOrder) -> None:
        self.inner = inner
        self.order = order

    async def recorded_reply(self, topic: str, message_id: str) -> RecordedReply | None:
        self.order.check(topic, message_id)
        return await self.inner.recorded_reply(topic, message_id)

    async def resolve_model(self, topic: str, requested: str | None) -> ModelRef:
        return await self.inner.resolve_model(topic, requested)

    def is_ai(self, author_id: str) -> bool:
        return self.inner.is_ai(author_id)

    async def history(self, topic: str) -> Sequence[ChatTurn]:
        return await self.inner.history(topic)

    async def record_reply(self, message: ChatMessage, reply: ChatMessage, completed: GenerationCompleted) -> None:
        await self.inner.record_reply(message, reply, completed)

    async def record_unanswered(self, message: ChatMessage, reason: str) -> None:
        await self.inner.record_unanswered(message, reason)

