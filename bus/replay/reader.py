"""``lamabus replay``'s reader: a topic's stored records, read from the JetStream log.

Everything a topic durably saw lives in the ``LAMA_TOPICS`` stream: the users'
``chat.message``s and the AI's replies on ``<prefix>.topic.<topic>.msg``, and the
``generation.*`` / ``message.rejected`` events on ``<prefix>.topic.<topic>.evt``.
They are read with a short-lived *ephemeral* pull consumer of its own (never the
service's durable ``lamabus-assistant``, so reading changes nothing).
:func:`records` yields every stored record, decoded, in stream order, with nothing
merged or dropped (what the fault tests count); bus/replay/fold.py makes a
conversation of them.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import AsyncIterator

import anyio
import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from bus.subjects import Subjects
from wire.errors import ErrorCode, LamaError
from wire.messages import TopicEvent, decode_topic_event, valid_topic_id


class Record(msgspec.Struct, frozen=True):
    """One stored record of the topic, decoded (``event``) or not (``error``)."""

    seq: int
    time: datetime
    subject: str
    event: TopicEvent | None
    error: str | None = None
    data: bytes = b""


class Idle:
    """Marker: the log had nothing more for a while (what :func:`read` yields between records)."""


IDLE = Idle()

_FETCH_BATCH = 256
#: How long a non-following read waits on a fetch before asking the consumer what is left.
_CATCH_UP_WAIT = 5.0
#: The ephemeral consumer disappears this long after its reader stops asking (a killed CLI).
_INACTIVE_THRESHOLD = 60.0


def _start_config(filter_subject: str, *, start_seq: int | None, since: datetime | None) -> ConsumerConfig:
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE, filter_subject=filter_subject, inactive_threshold=_INACTIVE_THRESHOLD,
        mem_storage=True, num_replicas=1, description="lamabus replay (ephemeral)",
    )
    if start_seq is not None:
        config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, start_seq
    elif since is not None:
        config.deliver_policy, config.opt_start_time = DeliverPolicy.BY_START_TIME, since
    else:
        config.deliver_policy = DeliverPolicy.ALL
    return config


def _decode(msg) -> Record:  # noqa: ANN001 - a nats Msg
    meta = msg.metadata
    try:
        event: TopicEvent | None = decode_topic_event(msg.data)
        error = None
    except LamaError as exc:
        event, error = None, exc.message
    return Record(seq=meta.sequence.stream, time=meta.timestamp, subject=msg.subject, event=event, error=error,
                  data=msg.data)


async def read(js: JetStreamContext, topic: str, *, prefix: str, from_seq: int | None, since: datetime | None,
                follow: bool, idle: float) -> AsyncIterator[Record | Idle]:
    """Records of ``topic`` in stream order; with ``follow``, forever (``IDLE`` when quiet).

    A following read survives a broker restart or a lost consumer: it makes a new
    consumer starting after the last record it yielded.
    """
    if not valid_topic_id(topic):
        raise LamaError(ErrorCode.BAD_REQUEST, f"invalid topic id {topic!r}: must match [A-Za-z0-9_-]{{1,128}}",
                        field="topic")
    if from_seq is not None and from_seq < 1:
        raise LamaError(ErrorCode.BAD_REQUEST, "--from-seq counts from 1", field="from_seq")
    subjects = Subjects(prefix)
    stream = subjects.stream_name
    filter_subject = f"{prefix}.topic.{topic}.*"  # .msg and .evt: the stream holds nothing else of the topic
    try:
        end_seq = (await js.stream_info(stream)).state.last_seq  # a non-following read stops there
    except NotFoundError:
        raise LamaError(ErrorCode.NOT_FOUND, f"stream {stream} does not exist: has lamabus (prefix {prefix!r}) "
                        "run against this broker?", stream=stream) from None

    last_seq: int | None = None
    consumer: str | None = None
    psub: JetStreamContext.PullSubscription | None = None

    async def drop() -> None:
        nonlocal consumer, psub
        name, sub, consumer, psub = consumer, psub, None, None
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                if sub is not None:
                    await sub.unsubscribe()
            with contextlib.suppress(Exception):
                if name is not None:
                    with anyio.fail_after(2):
                        await js.delete_consumer(stream, name)

    try:
        while True:
            if psub is None:
                start = last_seq + 1 if last_seq is not None else from_seq
                try:
                    info = await js.add_consumer(stream, _start_config(
                        filter_subject, start_seq=start, since=since if last_seq is None else None))
                except Exception:
                    if not follow:
                        raise
                    await anyio.sleep(0.5)  # broker away: retry until it is back
                    continue
                consumer = info.name
                psub = await js.pull_subscribe_bind(consumer, stream=stream)
                if not follow and not info.num_pending:
                    return  # nothing (more) to read from there
            try:
                msgs = await psub.fetch(_FETCH_BATCH, timeout=idle if follow else _CATCH_UP_WAIT)
            except (NatsTimeoutError, TimeoutError):
                if follow:
                    yield IDLE
                    try:  # a restarted broker may have lost our consumer; a fetch then just times out
                        await js.consumer_info(stream, consumer or "")
                    except Exception:
                        await drop()
                    continue
                info = await js.consumer_info(stream, consumer or "")
                if not info.num_pending:
                    return
                continue
            except Exception:
                if not follow:
                    raise
                await drop()
                await anyio.sleep(0.5)
                continue
            for msg in msgs:
                record = _decode(msg)
                if last_seq is not None and record.seq <= last_seq:
                    continue  # a recreated consumer never repeats, but be sure
                last_seq = record.seq
                yield record
                if not follow and (msg.metadata.num_pending == 0 or record.seq >= end_seq):
                    return
    finally:
        await drop()


async def records(js: JetStreamContext, topic: str, *, prefix: str = "lama", from_seq: int | None = None,
                  since: datetime | None = None, follow: bool = False, idle: float = 1.0) -> AsyncIterator[Record]:
    """Every stored record of ``topic`` (``.msg`` and ``.evt``), decoded, in stream order."""
    async with contextlib.aclosing(read(js, topic, prefix=prefix, from_seq=from_seq, since=since, follow=follow,
                                        idle=idle)) as items:
        async for item in items:
            if isinstance(item, Record):
                yield item
