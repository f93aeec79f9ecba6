"""Durable topic intake: the LAMA_TOPICS stream and the assistant's pull consumer.

Every ``chat.message`` is taken from JetStream by one durable consumer and handed
to the assistant with a :class:`JetStreamDelivery`; the assistant acks it only
once the reply is recorded and published, so a crash at any point means the
message is redelivered, never lost. A payload that cannot be accepted gets a
``message.rejected`` event and is terminated, so it is not redelivered forever.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import anyio
import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from bus.publisher import MSG_ID
from bus.subjects import Subjects
from wire.errors import ErrorCode, LamaError
from wire.messages import ChatMessage, MessageRejected, decode_topic_event, encode, valid_topic_id

log = logging.getLogger("lamabus.intake")

CONSUMER = "lamabus-assistant"


async def ensure_topics_stream(js: JetStreamContext, subjects: Subjects, *, duplicate_window: float) -> None:
    config = StreamConfig(
        name=subjects.stream_name,
        description="lamabus topic traffic: chat messages and generation events",
        subjects=[subjects.all_msg, subjects.all_evt],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=duplicate_window,
    )
    try:
        info = await js.stream_info(subjects.stream_name)
    except NotFoundError:
        await js.add_stream(config)
    else:
        # Update only what is ours: limits an operator set on the stream (max_age, max_bytes, ...)
        # must survive a restart.
        current = info.config
        current.subjects, current.duplicate_window = config.subjects, config.duplicate_window
        await js.update_stream(current)


async def _unsubscribe(psub: JetStreamContext.PullSubscription) -> None:
    try:
        await psub.unsubscribe()
    except Exception:  # already gone with its connection or consumer
        pass


class JetStreamDelivery:
    def __init__(self, msg: Msg) -> None:
        self._msg = msg

    @property
    def redelivered(self) -> bool:
        return self._msg.metadata.num_delivered > 1

    async def ack(self) -> None:
        await self._msg.ack()

    async def in_progress(self) -> None:
        await self._msg.in_progress()


Submit = Callable[[ChatMessage, JetStreamDelivery], Awaitable[None]]


class TopicIntake:
    """Pulls chat messages from the durable consumer and submits each one."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, submit: Submit, *,
                 ack_wait: float, duplicate_window: float, batch: int = 32) -> None:
        self.js = js
        self.subjects = subjects
        self.submit = submit
        self.ack_wait = ack_wait
        self.duplicate_window = duplicate_window
        self.batch = batch
        self.rejected = 0
        self.rebinds = 0

    async def _bind(self) -> JetStreamContext.PullSubscription:
        await ensure_topics_stream(self.js, self.subjects, duplicate_window=self.duplicate_window)
        # Create or update: pull_subscribe alone keeps an existing consumer's old settings, so a
        # changed ack_wait would never apply (and progress acks paced for it would not keep up).
        await self.js.add_consumer(self.subjects.stream_name, ConsumerConfig(
            durable_name=CONSUMER, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait, max_ack_pending=10_000, filter_subject=self.subjects.all_msg,
        ))
        return await self.js.pull_subscribe_bind(CONSUMER, stream=self.subjects.stream_name)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        psub = await self._bind()
        task_status.started()
        try:
            while True:
                try:
                    msgs = await psub.fetch(self.batch, timeout=5)
                except (NatsTimeoutError, TimeoutError):
                    continue
                except Exception as exc:
                    # The broker restarting, the connection lost, or the stream or consumer gone
                    # (a broker that came back with an empty store): bind again, from scratch.
                    log.warning("fetch failed (%s); binding the intake again", exc)
                    await anyio.sleep(0.5)
                    psub = await self._rebind(psub)
                    continue
                for msg in msgs:
                    await self._take(msg)
        finally:
            with anyio.CancelScope(shield=True):
                await _unsubscribe(psub)

    async def _rebind(self, old: JetStreamContext.PullSubscription) -> JetStreamContext.PullSubscription:
        try:
            new = await self._bind()
        except Exception as exc:  # still unreachable: keep the old one and try again on the next failure
            log.warning("binding the intake failed (%s)", exc)
            return old
        await _unsubscribe(old)
        self.rebinds += 1
        return new

    async def _take(self, msg: Msg) -> None:
        raw_topic = self.subjects.topic_of(msg.subject)
        try:
            if not valid_topic_id(raw_topic):
                raise LamaError(ErrorCode.BAD_REQUEST,
                                f"invalid topic id {raw_topic!r}: must match [A-Za-z0-9_-]{{1,128}}", field="topic")
            try:
                event = decode_topic_event(msg.data)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise LamaError.from_validation(exc) from None
            if not isinstance(event, ChatMessage):
                raise LamaError(ErrorCode.BAD_REQUEST, f"expected a chat.message on {msg.subject}, got {type(event).__name__}",
                                field="$.type")
            if event.topic != raw_topic:
                raise LamaError(ErrorCode.BAD_REQUEST,
                                f"message topic {event.topic!r} does not match subject topic {raw_topic!r}", field="$.topic")
        except LamaError as exc:
            await self._reject(msg, raw_topic, exc)
            return
        try:
            await self.submit(event, JetStreamDelivery(msg))
        except Exception:
            # Not acked: JetStream redelivers it after ack_wait.
            log.exception("submitting message %s failed", event.id)

    async def _reject(self, msg: Msg, raw_topic: str, exc: LamaError) -> None:
        self.rejected += 1
        message_id = None
        try:
            message_id = msgspec.json.decode(msg.data).get("id")
            message_id = message_id if isinstance(message_id, str) else None
        except Exception:
            pass
        rejected = MessageRejected(topic=raw_topic, error=exc.to_body(), message_id=message_id)
        log.info("rejected message on %s: %s", msg.subject, exc.message)
        try:
            # The evt subject of a bad topic token is still a valid subject: the sender listens there.
            subject = self.subjects.raw_topic_subject(raw_topic, "evt")
            await self.js.publish(subject, encode(rejected), headers={MSG_ID: f"rejected.{msg.metadata.sequence.stream}"})
        finally:
            await msg.term()
