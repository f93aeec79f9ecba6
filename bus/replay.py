"""``lamabus replay``: a topic's conversation, read back from the JetStream log.

Everything a topic durably saw lives in the ``LAMA_TOPICS`` stream: the users'
``chat.message``s and the AI's replies on ``<prefix>.topic.<topic>.msg``, and the
``generation.*`` / ``message.rejected`` events on ``<prefix>.topic.<topic>.evt``.
This module reads them with a short-lived *ephemeral* pull consumer of its own
(never the service's durable ``lamabus-assistant``, so replaying changes nothing)
and turns them into typed entries:

* :func:`records` yields every stored record, decoded, in stream order, with
  nothing merged or dropped (what the fault tests count);
* :func:`replay` yields the conversation: each user message, each AI reply joined
  with the ``generation.completed`` that describes it (model, timing, usage),
  failures, cancellations and rejections. A re-published copy of a message or of
  a completion (same id, published again after the broker's duplicate window) is
  shown once.

    async with contextlib.aclosing(replay(js, "demo")) as entries:
        async for entry in entries:
            print(format_entry(entry))

The CLI command (``lamabus replay <topic> [--from-seq N | --since TIME]
[--follow] [--json]``) is registered by :func:`register`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import AsyncIterator, Callable, Iterable, Union

import anyio
import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from bus.config import Settings
from bus.subjects import Subjects
from wire.errors import ErrorCode, LamaError
from wire.messages import (
    ChatMessage,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    GenerationToken,
    MessageRejected,
    TopicEvent,
    decode_topic_event,
    valid_topic_id,
)

# -- raw records ----------------------------------------------------------------


class Record(msgspec.Struct, frozen=True):
    """One stored record of the topic, decoded (``event``) or not (``error``)."""

    seq: int
    time: datetime
    subject: str
    event: TopicEvent | None
    error: str | None = None
    data: bytes = b""


class _Idle:
    """Marker: the log had nothing more for a while (only yielded internally)."""


_IDLE = _Idle()

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


async def _read(js: JetStreamContext, topic: str, *, prefix: str, from_seq: int | None, since: datetime | None,
                follow: bool, idle: float) -> AsyncIterator[Record | _Idle]:
    """Records of ``topic`` in stream order; with ``follow``, forever (``_IDLE`` when quiet).

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
                    yield _IDLE
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
    async with contextlib.aclosing(_read(js, topic, prefix=prefix, from_seq=from_seq, since=since, follow=follow,
                                         idle=idle)) as items:
        async for item in items:
            if isinstance(item, Record):
                yield item


# -- conversation entries -------------------------------------------------------


class _Entry(msgspec.Struct, frozen=True, rename="camel", tag_field="kind"):
    #: Stream sequence of the record the entry comes from (the reply's chat.message for a reply).
    seq: int
    #: When the broker stored that record.
    time: datetime
    topic: str


class MessageEntry(_Entry, tag="message"):
    """A message from a person or a program (or an AI message that answers nothing)."""

    message: ChatMessage


class ReplyEntry(_Entry, tag="reply"):
    """An AI reply: its ``chat.message`` and the ``generation.completed`` that describes it.

    Either may be missing: ``completed`` when the service stopped between the two
    publishes and has not redelivered yet, ``message`` when the read starts between them.
    """

    message: ChatMessage | None = None
    completed: GenerationCompleted | None = None

    @property
    def reply_id(self) -> str:
        return self.message.id if self.message is not None else self.completed.message_id  # type: ignore[union-attr]

    @property
    def reply_to(self) -> str | None:
        return self.message.reply_to if self.message is not None else self.completed.request_id  # type: ignore[union-attr]

    @property
    def text(self) -> str:
        return self.message.text if self.message is not None else self.completed.text  # type: ignore[union-attr]

    @property
    def model_id(self) -> str | None:
        if self.completed is not None:
            return self.completed.model_id
        return self.message.model_id if self.message is not None else None


class CompletedEntry(_Entry, tag="completed"):
    """A ``generation.completed`` that came after its reply was already shown without it."""

    event: GenerationCompleted


class StartedEntry(_Entry, tag="started"):
    event: GenerationStarted


class FailedEntry(_Entry, tag="failed"):
    event: GenerationFailed


class CancelledEntry(_Entry, tag="cancelled"):
    event: GenerationCancelled


class RejectedEntry(_Entry, tag="rejected"):
    event: MessageRejected


class UnreadableEntry(_Entry, tag="unreadable"):
    """A stored record that is not a valid topic payload (lamabus rejected it when it came)."""

    subject: str
    error: str
    data: str


Entry = Union[MessageEntry, ReplyEntry, CompletedEntry, StartedEntry, FailedEntry, CancelledEntry, RejectedEntry,
              UnreadableEntry]


@dataclass(eq=False)
class _Held:
    entry: Entry
    waiting: bool = False  # a reply whose generation.completed has not come yet


class _Conversation:
    """Turns records into entries: joins replies with their completions, drops re-published copies.

    A reply's ``chat.message`` comes a moment before its ``generation.completed``;
    entries are held back (keeping their order) until it does, or the log goes quiet.
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.held: collections.deque[_Held] = collections.deque()
        self.waiting: dict[str, _Held] = {}
        self.messages_seen: set[str] = set()
        self.completions_seen: set[str] = set()
        self.shown_without_stats: set[str] = set()
        self.ai_authors: set[str] = set()
        self.answered_by: dict[str, str] = {}  # request id -> the AI that started on it

    def take(self, record: Record) -> list[Entry]:
        base = {"seq": record.seq, "time": record.time, "topic": self.topic}
        event = record.event
        match event:
            case None:
                return self._add(UnreadableEntry(**base, subject=record.subject, error=record.error or "",
                                                 data=record.data[:512].decode(errors="replace")))
            case ChatMessage():
                if event.id in self.messages_seen:
                    return []
                self.messages_seen.add(event.id)
                if self._looks_like_reply(event):
                    held = _Held(ReplyEntry(**base, message=event), waiting=True)
                    self.waiting[event.id] = held
                    self.held.append(held)
                    return []
                return self._add(MessageEntry(**base, message=event))
            case GenerationCompleted():
                self.ai_authors.add(event.author_id)
                if event.message_id in self.completions_seen:
                    return []
                self.completions_seen.add(event.message_id)
                held = self.waiting.pop(event.message_id, None)
                if held is not None:
                    held.entry = msgspec.structs.replace(held.entry, completed=event)  # type: ignore[arg-type]
                    held.waiting = False
                    return self._release()
                if event.message_id in self.shown_without_stats:
                    return self._add(CompletedEntry(**base, event=event))
                self.messages_seen.add(event.message_id)  # its chat.message, if it comes later, is this reply
                return self._add(ReplyEntry(**base, completed=event))
            case GenerationStarted():
                self.ai_authors.add(event.author_id)
                self.answered_by.setdefault(event.request_id, event.author_id)
                return self._add(StartedEntry(**base, event=event))
            case GenerationFailed():
                return self._add(FailedEntry(**base, event=event))
            case GenerationCancelled():
                self.ai_authors.add(event.author_id)
                return self._add(CancelledEntry(**base, event=event))
            case MessageRejected():
                return self._add(RejectedEntry(**base, event=event))
            case GenerationToken():
                return []  # tokens are never stored; nothing to show if one were
        return []

    def _looks_like_reply(self, message: ChatMessage) -> bool:
        if message.reply_to is None:
            return False
        if message.author_id in self.ai_authors:
            return True
        starter = self.answered_by.get(message.reply_to)
        return starter is None or starter == message.author_id  # unknown: wait and see

    def _add(self, entry: Entry) -> list[Entry]:
        if not self.held:
            return [entry]
        self.held.append(_Held(entry))
        return self._release()

    def _release(self) -> list[Entry]:
        out: list[Entry] = []
        while self.held and not self.held[0].waiting:
            out.append(self.held.popleft().entry)
        return out

    def flush(self) -> list[Entry]:
        """The log is quiet or ended: show what is held, replies without their stats."""
        out: list[Entry] = []
        while self.held:
            held = self.held.popleft()
            entry = held.entry
            if held.waiting and isinstance(entry, ReplyEntry) and entry.message is not None:
                self.waiting.pop(entry.message.id, None)
                if entry.message.author_id not in self.ai_authors:
                    entry = MessageEntry(seq=entry.seq, time=entry.time, topic=entry.topic, message=entry.message)
                else:
                    self.shown_without_stats.add(entry.message.id)
            out.append(entry)
        return out


async def replay(js: JetStreamContext, topic: str, *, prefix: str = "lama", from_seq: int | None = None,
                 since: datetime | None = None, follow: bool = False, settle: float = 1.0) -> AsyncIterator[Entry]:
    """The conversation in ``topic`` as typed entries, in stream order.

    ``from_seq`` / ``since``: where to start (default: the beginning of the log).
    ``follow``: keep going as new records arrive (until cancelled or closed).
    ``settle``: seconds a following read waits for a reply's completion before
    showing the reply without it.
    """
    conversation = _Conversation(topic)
    async with contextlib.aclosing(_read(js, topic, prefix=prefix, from_seq=from_seq, since=since, follow=follow,
                                         idle=settle)) as items:
        async for item in items:
            for entry in conversation.flush() if isinstance(item, _Idle) else conversation.take(item):
                yield entry
    for entry in conversation.flush():
        yield entry


# -- presentation ---------------------------------------------------------------

_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``--since``: an ISO 8601 time (no zone: local time) or an age like ``90s``, ``15m``, ``2h``, ``3d``, ``1w``."""
    now = now or datetime.now(timezone.utc)
    if m := _AGE_RE.match(text):
        return now - timedelta(**{_AGE_UNITS[m.group(2)]: float(m.group(1))})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise LamaError(ErrorCode.BAD_REQUEST, f"--since {text!r}: expected an ISO 8601 time "
                        "(2026-01-31T12:00:00Z) or an age (90s, 15m, 2h, 3d, 1w)", field="since") from None
    return when.astimezone(timezone.utc)  # a naive time is local time


def _stamp(entry: Entry) -> str:
    return f"#{entry.seq} {entry.time.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S}Z"


def _indent(text: str, pad: str = "    ") -> str:
    return text.replace("\n", "\n" + pad)


def _stats(completed: GenerationCompleted) -> str:
    t, u = completed.timing, completed.usage
    return (f"{completed.finish_reason} | {completed.tokens} tokens, "
            f"{t.tokens_per_second:.1f} tok/s, first token {t.time_to_first_token:.0f} ms, "
            f"total {t.elapsed_time / 1000:.2f} s, queued {t.queue_time:.0f} ms | "
            f"prompt {u.prompt_tokens} (cached {u.cached_tokens}), completion {u.completion_tokens}, "
            f"total {u.total_tokens}")


def format_entry(entry: Entry) -> str | None:
    """One entry for people to read (``None``: not shown, e.g. ``generation.started``)."""
    head = _stamp(entry)
    match entry:
        case MessageEntry(message=m):
            re_ = f" re {m.reply_to}" if m.reply_to else ""
            return f"{head}  {m.author_id} [{m.id}{re_}]: {_indent(m.text)}"
        case ReplyEntry():
            lines = [f"{head}  AI {entry.model_id or '?'} [re {entry.reply_to}]: {_indent(entry.text)}"]
            if entry.completed is not None:
                if entry.completed.thinking:
                    lines.append(f"    (thinking: {_indent(entry.completed.thinking)})")
                lines.append(f"    {_stats(entry.completed)}")
            else:
                lines.append("    (no generation.completed in the log for this reply)")
            return "\n".join(lines)
        case CompletedEntry(event=c):
            return f"{head}  stats for the reply to {c.request_id}: {_stats(c)}"
        case StartedEntry():
            return None
        case FailedEntry(event=e):
            return f"{head}  ! failed [re {e.request_id}]: {e.error.code.value}: {e.error.message}"
        case CancelledEntry(event=e):
            return f"{head}  ~ cancelled [re {e.request_id}] after {e.tokens} tokens: {_indent(e.text)!r}"
        case RejectedEntry(event=e):
            which = f" message {e.message_id}" if e.message_id else ""
            return f"{head}  ! rejected{which}: {e.error.code.value}: {e.error.message}"
        case UnreadableEntry():
            return f"{head}  ? unreadable record on {entry.subject}: {entry.error}"
    return None


_entry_encoder = msgspec.json.Encoder()


def entry_json(entry: Entry) -> str:
    """One entry as one line of JSON (camelCase, ``kind`` says which)."""
    return _entry_encoder.encode(entry).decode()


# -- the CLI ----------------------------------------------------------------------


def _write(lines: Iterable[str]) -> None:
    for line in lines:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _replay_main(args: argparse.Namespace, url: str, prefix: str, since: datetime | None) -> int:
    from bus.connection import connect

    try:
        nc = await connect(url, name="lamabus-replay", reconnect_forever=args.follow)
    except Exception as exc:
        raise LamaError(ErrorCode.TIMEOUT, f"cannot reach NATS at {url}: {exc or type(exc).__name__}") from None
    try:
        async with contextlib.aclosing(replay(nc.jetstream(), args.topic, prefix=prefix, from_seq=args.from_seq,
                                              since=since, follow=args.follow)) as entries:
            async for entry in entries:
                line = entry_json(entry) if args.json else format_entry(entry)
                if line is not None:
                    _write([line])
    finally:
        with anyio.CancelScope(shield=True):
            await nc.close()
    return 0


def _run(args: argparse.Namespace, settings: Settings) -> int:

    since = parse_since(args.since) if args.since else None
    try:
        return anyio.run(_replay_main, args, settings.client_url(), settings.prefix, since)
    except BrokenPipeError:  # `lamabus replay demo | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's final flush
        return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
             common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = sub.add_parser(
        "replay", help="print a topic's conversation from the JetStream log",
        description="Print the conversation in TOPIC as JetStream stored it: messages, AI replies with model, "
                    "timing and token usage, failures, cancellations and rejections. Reads with an ephemeral "
                    "consumer; the service's own consumer is not touched.")
    common(parser)
    parser.add_argument("topic")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--from-seq", type=int, metavar="N", help="start at stream sequence N (the #N shown)")
    start.add_argument("--since", metavar="TIME",
                       help="start at a time: ISO 8601 (2026-01-31T12:00:00Z; no zone = local) or an age (15m, 2h, 3d)")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new records as they come")
    parser.add_argument("--json", action="store_true", help="one JSON object per line (every entry, kind-tagged)")
    parser.set_defaults(run=_run)
