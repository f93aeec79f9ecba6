"""Durable topic intake: the LAMA_TOPICS stream and the assistant's pull consumer.

Every ``chat.message`` is taken from JetStream by one durable consumer and handed
to the assistant with a :class:`JetStreamDelivery`; the assistant acks it only
once the reply is recorded and published, so a crash at any point means the
message is redelivered, never lost. A payload that cannot be accepted gets a
``message.rejected`` event and is terminated, so it is not redelivered forever.

Back-pressure: the intake holds at most ``window`` messages that are taken and
not yet settled (acked, terminated or handed back). A burst beyond that stays
in the stream, durable, and is fetched as replies finish: the broker queues,
nothing is refused for lack of room in memory. The consumer's
``max_ack_pending`` is the same bound on the broker's side.

Whatever bytes arrive, ``_take`` ends in a coded rejection, a submission, or
(when even the rejection cannot be published) a message handed back to the
broker for later; no exception from one message leaves the fetch loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from typing import AsyncIterator, Awaitable, Callable

import anyio
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from bus.node.publisher import MSG_ID
from bus.subjects import Subjects
from wire.errors import ErrorCode, LamaError
from wire.messages import ChatMessage, MessageRejected, decode_topic_event, encode, valid_topic_id

log = logging.getLogger("lamabus.intake")

CONSUMER = "lamabus-assistant"
#: A subject token we may publish on: printable ASCII without NATS wildcards.
_PUBLISHABLE_TOKEN = re.compile(r"^[!-~]+$")
#: Delay before a message we could not even reject is offered again.
_RETRY_DELAY = 2.0


class StreamLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Retention of the topics stream. ``None`` keeps what the stream has (an operator's
    ``nats stream edit`` survives restarts); a value is applied on every start."""

    max_age: float | None = None
    max_bytes: int | None = None
    #: Applied only when the stream is first created, if the fields above are None.
    default_max_age: float = 30 * 86400.0
    default_max_bytes: int = 8 << 30


async def ensure_topics_stream(js: JetStreamContext, subjects: Subjects, *, duplicate_window: float,
                               limits: StreamLimits | None = None, replicas: int | None = None) -> None:
    """``replicas``: copies of the stream when it is created (None: 1). An existing stream keeps its own."""
    limits = limits or StreamLimits()
    config = StreamConfig(
        name=subjects.stream_name,
        description="lamabus topic traffic: chat messages and generation events",
        subjects=[subjects.all_msg, subjects.all_evt, subjects.rejected],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=duplicate_window,
        max_age=limits.max_age if limits.max_age is not None else limits.default_max_age,
        max_bytes=limits.max_bytes if limits.max_bytes is not None else limits.default_max_bytes,
        num_replicas=replicas or 1,
    )
    try:
        info = await js.stream_info(subjects.stream_name)
    except NotFoundError:
        await js.add_stream(config)
        return
    # Update only what is ours, and the limits the settings name: the rest (an operator's
    # max_age, max_bytes, replicas, ...) must survive a restart.
    current = info.config
    current.subjects, current.duplicate_window = config.subjects, config.duplicate_window
    if limits.max_age is not None:
        current.max_age = limits.max_age
    if limits.max_bytes is not None:
        current.max_bytes = limits.max_bytes
    await js.update_stream(current)


async def _unsubscribe(psub: JetStreamContext.PullSubscription) -> None:
    try:
        await psub.unsubscribe()
    except Exception:  # already gone with its connection or consumer
        pass


class JetStreamDelivery:
    """One consumed message. Settling it (ack, term, or handing it back) frees its place in the window."""

    def __init__(self, msg: Msg, on_settled: Callable[[], None] = lambda: None) -> None:
        self._msg = msg
        self._on_settled = on_settled
        self._settled = False

    @property
    def redelivered(self) -> bool:
        return self._msg.metadata.num_delivered > 1

    def _settle(self) -> None:
        if not self._settled:
            self._settled = True
            self._on_settled()

    async def ack(self) -> None:
        await self._msg.ack()
        self._settle()

    async def term(self) -> None:
        """Never raises: a term that does not reach the broker means one more redelivery, rejected again."""
        try:
            await self._msg.term()
        except Exception as exc:
            log.warning("could not terminate message %s (%s)", self._msg.metadata.sequence.stream, exc)
        finally:
            self._settle()

    async def in_progress(self) -> None:
        await self._msg.in_progress()

    async def retry_later(self, delay: float = _RETRY_DELAY) -> None:
        """Hand the message back: the broker offers it again after ``delay`` (or, if even this
        cannot be said, after ack_wait). Never raises."""
        try:
            await self._msg.nak(delay=delay)
        except Exception as exc:
            log.warning("could not hand message %s back (%s); it returns after ack_wait",
                        self._msg.metadata.sequence.stream, exc)
        finally:
            self._settle()


Submit = Callable[[ChatMessage, JetStreamDelivery], Awaitable[None]]


class TopicIntake:
    """Pulls chat messages from the durable consumer and submits each one."""

    def __init__(self, nc: Client, subjects: Subjects, submit: Submit, *,
                 ack_wait: float, duplicate_window: float, window: int = 64, batch: int = 32,
                 limits: StreamLimits | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self.submit = submit
        self.ack_wait = ack_wait
        self.duplicate_window = duplicate_window
        self.window = window
        self.batch = batch
        self.limits = limits
        self.rejected = 0
        self.rebinds = 0
        self.taken = 0
        self.in_flight = 0
        self._room = anyio.Event()

    def _settled(self) -> None:
        self.in_flight -= 1
        self._room.set()

    async def _wait_for_room(self) -> int:
        while self.in_flight >= self.window:
            self._room = anyio.Event()
            await self._room.wait()
        return self.window - self.in_flight

    async def _bind(self) -> JetStreamContext.PullSubscription:
        await ensure_topics_stream(self.js, self.subjects, duplicate_window=self.duplicate_window, limits=self.limits)
        # Create or update: pull_subscribe alone keeps an existing consumer's old settings, so a
        # changed ack_wait would never apply (and progress acks paced for it would not keep up).
        await self.js.add_consumer(self.subjects.stream_name, ConsumerConfig(
            durable_name=CONSUMER, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait, max_ack_pending=self.window, filter_subject=self.subjects.all_msg,
        ))
        return await self.js.pull_subscribe_bind(CONSUMER, stream=self.subjects.stream_name)

    async def waiting_in_stream(self) -> int | None:
        """Messages the broker holds for us and has not delivered yet (None when it cannot say now)."""
        try:
            info = await self.js.consumer_info(self.subjects.stream_name, CONSUMER)
        except Exception:
            return None
        return info.num_pending

    @contextlib.asynccontextmanager
    async def answering_wildcard_topics(self) -> AsyncIterator[None]:
        """JetStream stores a message published on ``<prefix>.topic.>.msg`` (the stream's ``*``
        matches the literal ``>`` token) but no consumer filtered on ``*.msg`` ever delivers it: it
        would be accepted and never answered. Core delivery does match it, so while this is entered
        such a message is answered from a plain subscription, as it is published."""
        wildcards = await self.nc.subscribe(self.subjects.all_msg, cb=self._on_core_msg)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):  # gone with its connection
                await wildcards.unsubscribe()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        psub = await self._bind()
        async with self.answering_wildcard_topics():
            task_status.started()
            await self._pull(psub)

    async def _pull(self, psub: JetStreamContext.PullSubscription) -> None:
        try:
            while True:
                room = await self._wait_for_room()
                try:
                    msgs = await psub.fetch(min(self.batch, room), timeout=5)
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
                    self.in_flight += 1
                    self.taken += 1
                    await self._take(msg)
        finally:
            with anyio.CancelScope(shield=True):
                await _unsubscribe(psub)

    async def _on_core_msg(self, msg: Msg) -> None:
        try:
            if self.subjects.topic_of(msg.subject) != ">":
                return  # the durable consumer delivers it
            error = LamaError(ErrorCode.BAD_REQUEST, "invalid topic id '>': a NATS wildcard cannot name a topic",
                              field="topic")
            rejected = MessageRejected(topic=">", error=error.to_body(), message_id=_message_id_of(msg.data))
            self.rejected += 1
            digest = hashlib.sha256(msg.data).hexdigest()[:24]
            await self.js.publish(self.subjects.rejected, encode(rejected), headers={MSG_ID: f"rejected.wild.{digest}"})
        except Exception as exc:  # a callback that raises is only logged by nats-py; say what happened
            log.warning("could not answer a message on %r: %s", msg.subject, exc)

    async def _rebind(self, old: JetStreamContext.PullSubscription) -> JetStreamContext.PullSubscription:
        try:
            new = await self._bind()
        except Exception as exc:  # still unreachable: keep the old one and try again on the next failure
            log.warning("binding the intake failed (%s)", exc)
            return old
        await _unsubscribe(old)
        self.rebinds += 1
        return new

    def _delivery(self, msg: Msg) -> JetStreamDelivery:
        return JetStreamDelivery(msg, self._settled)

    async def _take(self, msg: Msg) -> None:
        delivery = self._delivery(msg)
        try:
            accepted = self._accept(msg)
        except LamaError as exc:
            await self._reject(msg, delivery, exc)
            return
        except Exception as exc:  # a bug in accepting must cost this message, not the intake
            log.exception("accepting the message at %s failed", msg.subject)
            await self._reject(msg, delivery, LamaError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
            return
        try:
            await self.submit(accepted, delivery)
        except Exception:
            log.exception("submitting message %s failed; handed back for later", accepted.id)
            await delivery.retry_later()

    def _accept(self, msg: Msg) -> ChatMessage:
        raw_topic = self.subjects.topic_of(msg.subject)
        if not valid_topic_id(raw_topic):
            raise LamaError(ErrorCode.BAD_REQUEST,
                            f"invalid topic id {raw_topic!r}: must match [A-Za-z0-9_-]{{1,128}}", field="topic")
        event = decode_topic_event(msg.data)
        if not isinstance(event, ChatMessage):
            raise LamaError(ErrorCode.BAD_REQUEST, f"expected a chat.message on {msg.subject}, got {type(event).__name__}",
                            field="$.type")
        if event.topic != raw_topic:
            raise LamaError(ErrorCode.BAD_REQUEST,
                            f"message topic {event.topic!r} does not match subject topic {raw_topic!r}", field="$.topic")
        return event

    def rejection_subject(self, subject: str) -> str:
        """Where the sender of a rejected message hears why: its topic's evt subject when that is
        one we can publish on, else ``<prefix>.rejected`` (a token with wildcards, spaces, bytes
        that are not UTF-8, ...)."""
        try:
            token = self.subjects.topic_of(subject)
        except ValueError:
            return self.subjects.rejected
        if _PUBLISHABLE_TOKEN.match(token) and token not in ("*", ">"):
            return self.subjects.raw_topic_subject(token, "evt")
        return self.subjects.rejected

    async def _reject(self, msg: Msg, delivery: JetStreamDelivery, exc: LamaError) -> None:
        self.rejected += 1
        message_id = _message_id_of(msg.data)
        try:
            raw_topic = self.subjects.topic_of(msg.subject)
        except ValueError:
            raw_topic = msg.subject
        rejected = MessageRejected(topic=raw_topic, error=exc.to_body(), message_id=message_id)
        log.info("rejected message on %r: %s", msg.subject, exc.message)
        try:
            await self.js.publish(self.rejection_subject(msg.subject), encode(rejected),
                                  headers={MSG_ID: f"rejected.{msg.metadata.sequence.stream}"})
        except Exception as publish_exc:
            # The answer could not be recorded (broker away): keep the message, answer it later.
            log.warning("could not publish the rejection of %r (%s); handed back", msg.subject, publish_exc)
            await delivery.retry_later()
            return
        await delivery.term()


def _message_id_of(data: bytes) -> str | None:
    """The ``id`` of a payload we could not accept, when it has a usable one, to tell the sender which."""
    try:
        value = msgspec.json.decode(data)
    except Exception:
        return None
    message_id = value.get("id") if isinstance(value, dict) else None
    return message_id if isinstance(message_id, str) and 0 < len(message_id) <= 128 else None
