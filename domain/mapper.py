"""Between the domain's events and the store's opaque records.

The store keeps ``(type, data bytes)`` and knows nothing else; this module is
the one place that encodes a :class:`DomainEvent` for it and decodes what it
gives back, so a new event type or encoding never touches a store backend
(eventsourcing's mapper and recorders split the same way).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import msgspec

from domain.events import DomainEvent, decode_event, encode_event, event_type
from storage.store import AppendRequest, EventStore, NewEvent, StoredEvent, new_event_id
from wire.errors import ErrorCode, LamaError


class Keyed(msgspec.Struct, frozen=True):
    """An event with an id derived from what it records, so that deciding it twice stores it once."""

    event: DomainEvent
    event_id: str


class Append(msgspec.Struct, frozen=True):
    """What a decision wants appended to one stream, and the stream version it decided on
    (``expected_version`` 0: the stream must not exist yet; None: no check)."""

    stream_id: str
    events: Sequence[DomainEvent | Keyed]
    expected_version: int | None = None


class RecordedEvent(msgspec.Struct, frozen=True):
    """A stored event decoded: the log's coordinates and the domain event itself."""

    position: int
    stream_id: str
    version: int
    event_id: str
    event: DomainEvent
    recorded_at: int
    """Epoch milliseconds of the commit (store metadata; projections use ``event.at``)."""

    @property
    def type(self) -> str:
        return event_type(self.event)


def to_new_event(event: DomainEvent | Keyed) -> NewEvent:
    keyed = event if isinstance(event, Keyed) else Keyed(event, new_event_id())
    if not isinstance(keyed.event, DomainEvent):
        raise LamaError(ErrorCode.BAD_REQUEST, f"not a domain event: {type(keyed.event).__name__}")
    data = encode_event(keyed.event)
    # Structs are not validated when built in Python; a value the decoder rejects (a temperature
    # of 9, a NaN) would make the log unreadable, so check before it is stored.
    decode_event(data)
    return NewEvent(event_type(keyed.event), data, keyed.event_id)


def to_requests(appends: Sequence[Append]) -> list[AppendRequest]:
    return [AppendRequest(a.stream_id, [to_new_event(e) for e in a.events], a.expected_version) for a in appends]


def to_recorded(stored: StoredEvent) -> RecordedEvent:
    """Decode one stored event; an unreadable one is ``internal`` naming its position."""
    try:
        event = decode_event(stored.data)
    except LamaError as exc:
        # Our own log, written through the same codec: unreadable means damaged or written by a newer lamabus.
        raise LamaError(ErrorCode.INTERNAL, f"stored event at position {stored.position} ({stored.stream_id} "
                        f"v{stored.version}) cannot be read: {exc.message}", position=stored.position) from None
    if stored.type and stored.type != event_type(event):
        raise LamaError(ErrorCode.INTERNAL, f"stored event at position {stored.position} is recorded as "
                        f"{stored.type!r} but holds {event_type(event)!r}", position=stored.position)
    return RecordedEvent(stored.position, stored.stream_id, stored.version, stored.event_id, event,
                         stored.recorded_at)


async def append(store: EventStore, appends: Sequence[Append]) -> list[bool]:
    """Append decided events in one atomic batch; per stream, whether anything new was stored."""
    results = await store.append_batch(to_requests(appends))
    return [not r.duplicate for r in results]


async def read_stream(store: EventStore, stream_id: str, from_version: int = 1) -> list[RecordedEvent]:
    return [to_recorded(s) for s in await store.read_stream(stream_id, from_version)]


async def read_all(store: EventStore, after: int = 0, limit: int | None = None) -> list[RecordedEvent]:
    return [to_recorded(s) for s in await store.read_all(after, limit)]


async def iter_all(store: EventStore, after: int = 0, page_size: int = 2000) -> AsyncIterator[RecordedEvent]:
    async for stored in store.iter_all(after, page_size):
        yield to_recorded(stored)


async def follow(store: EventStore, after: int = 0) -> AsyncIterator[RecordedEvent]:
    async for stored in store.follow(after):
        yield to_recorded(stored)
