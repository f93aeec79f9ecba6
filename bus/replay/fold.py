"""``lamabus replay``'s fold: stored records in, conversation entries out (pure: no I/O).

Each user message becomes a :class:`MessageEntry`; each AI reply a :class:`ReplyEntry`
joined with the ``generation.completed`` that describes it (model, timing, usage);
failures, cancellations and rejections their own entries. A re-published copy of a
message or of a completion (same id, published again after the broker's duplicate
window) is shown once.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from datetime import datetime
from typing import Union

import msgspec

from bus.replay.reader import Record
from wire.messages import (
    ChatMessage,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    GenerationToken,
    MessageRejected,
    TopicAnalysed,
)


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


class AnalysedEntry(_Entry, tag="analysed"):
    event: TopicAnalysed


class UnreadableEntry(_Entry, tag="unreadable"):
    """A stored record that is not a valid topic payload (lamabus rejected it when it came)."""

    subject: str
    error: str
    data: str


Entry = Union[MessageEntry, ReplyEntry, CompletedEntry, StartedEntry, FailedEntry, CancelledEntry, RejectedEntry,
              AnalysedEntry, UnreadableEntry]


@dataclass(eq=False)
class _Held:
    entry: Entry
    waiting: bool = False  # a reply whose generation.completed has not come yet


class Conversation:
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
            case TopicAnalysed():
                return self._add(AnalysedEntry(**base, event=event))
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

