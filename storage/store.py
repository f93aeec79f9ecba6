"""The event store interface, and the in-memory store that shares its test suite with SQLite.

The store records opaque events: a ``type`` string and ``data`` bytes in a
versioned stream. It never decodes them; what the types mean, how they are
encoded and how they fold into state is the domain's business
(``domain.mapper`` turns domain events into :class:`NewEvent` and
:class:`StoredEvent` back into domain events), as eventsourcing keeps its
recorders ignorant of the aggregates.

Semantics every implementation keeps (``tests/test_store.py`` checks both):

* A stream's versions are 1, 2, 3, ... with no gaps; ``(stream_id, version)``
  is the optimistic-concurrency key. ``expected_version`` is the version the
  caller last saw: ``NO_STREAM`` (0) for "must not exist yet", ``ANY`` (None)
  for no check. A mismatch raises ``LamaError(conflict, expected=, actual=)``.
* Every event gets one global ``position`` (1, 2, 3, ...), increasing in commit
  order, so "everything after position p" is a complete catch-up.
* Every event has an id. Appending ids that are already stored returns the
  original positions and stores nothing: a retried append (a timeout whose
  commit in fact went through, a redelivered message) is harmless. Some but
  not all ids stored is a conflict, not a silent partial append.
* ``append_batch`` commits appends to several streams in one transaction:
  all of them or none.
* ``follow(after)`` yields what is stored, then waits for new commits; an
  in-process commit wakes it at once.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

import anyio
import msgspec

from wire.errors import ErrorCode, LamaError, stream_conflict

NO_STREAM = 0
ANY: None = None

MAX_STREAM_ID = 200
MAX_TYPE = 200


def new_event_id() -> str:
    return uuid.uuid4().hex


class NewEvent(msgspec.Struct, frozen=True):
    """An event to append: its type, its encoded data, and the id that makes retrying it idempotent."""

    type: str
    data: bytes
    event_id: str = msgspec.field(default_factory=new_event_id)


class AppendRequest(msgspec.Struct, frozen=True):
    stream_id: str
    events: Sequence[NewEvent]
    expected_version: int | None = ANY


class AppendResult(msgspec.Struct, frozen=True):
    stream_id: str
    positions: tuple[int, ...]
    last_version: int
    """The stream's version after this append: pass it as the next ``expected_version``."""
    duplicate: bool = False
    """True when every event id was already stored and nothing new was written."""


class StoredEvent(msgspec.Struct, frozen=True):
    """An event as recorded: where it sits in the log, and its type and data exactly as appended."""

    position: int
    stream_id: str
    version: int
    event_id: str
    type: str
    data: bytes
    recorded_at: int
    """Epoch milliseconds of the commit (store metadata; the domain keeps its own times)."""


def now_ms() -> int:
    return int(time.time() * 1000)


class _Prepared(msgspec.Struct, frozen=True):
    stream_id: str
    expected_version: int | None
    items: tuple[tuple[str, str, bytes], ...]  # (event_id, type, encoded data)


def prepare(requests: Sequence[AppendRequest]) -> list[_Prepared]:
    """Validate and encode before any transaction opens, so a bad event never half-commits."""
    if not requests:
        raise LamaError(ErrorCode.BAD_REQUEST, "nothing to append")
    seen_ids: set[str] = set()
    seen_streams: set[str] = set()
    out: list[_Prepared] = []
    for req in requests:
        sid = req.stream_id
        if not isinstance(sid, str) or not sid or len(sid) > MAX_STREAM_ID:
            raise LamaError(ErrorCode.BAD_REQUEST, f"invalid stream id {sid!r}", stream_id=sid)
        if sid in seen_streams:
            # Two requests for one stream would need two expected versions for one read.
            raise LamaError(ErrorCode.BAD_REQUEST, f"stream {sid} appears twice in one batch", stream_id=sid)
        seen_streams.add(sid)
        if req.expected_version is not None and req.expected_version < 0:
            raise LamaError(ErrorCode.BAD_REQUEST, "expected_version must be >= 0 or None", stream_id=sid)
        if not req.events:
            raise LamaError(ErrorCode.BAD_REQUEST, f"no events for stream {sid}", stream_id=sid)
        items = []
        for new in req.events:
            if not isinstance(new, NewEvent):
                raise LamaError(ErrorCode.BAD_REQUEST, f"not a NewEvent: {type(new).__name__}", stream_id=sid)
            if not isinstance(new.type, str) or not new.type or len(new.type) > MAX_TYPE:
                raise LamaError(ErrorCode.BAD_REQUEST, f"invalid event type {new.type!r}", stream_id=sid)
            if not isinstance(new.data, bytes):
                raise LamaError(ErrorCode.BAD_REQUEST, f"event data must be bytes, not {type(new.data).__name__}",
                                stream_id=sid)
            if not isinstance(new.event_id, str) or not new.event_id or new.event_id in seen_ids:
                raise LamaError(ErrorCode.BAD_REQUEST, f"duplicate or empty event id {new.event_id!r} in one append",
                                event_id=new.event_id)
            seen_ids.add(new.event_id)
            items.append((new.event_id, new.type, new.data))
        out.append(_Prepared(sid, req.expected_version, tuple(items)))
    return out


def check_duplicates(
    prepared: Sequence[_Prepared], stored: dict[str, tuple[str, int, int, str]],
) -> list[AppendResult] | None:
    """Given the already-stored rows for the batch's ids (id -> stream, version, position, type):
    ``None`` when none are stored, the original results when all are, else a conflict."""
    if not stored:
        return None
    total = sum(len(p.items) for p in prepared)
    if len(stored) != total:
        raise LamaError(
            ErrorCode.CONFLICT, f"{len(stored)} of {total} event ids are already stored; refusing a partial retry",
            event_ids=sorted(stored),
        )
    results = []
    for p in prepared:
        positions, versions = [], []
        for event_id, etype, _ in p.items:
            stream_id, version, position, stored_type = stored[event_id]
            if stream_id != p.stream_id or stored_type != etype:
                raise LamaError(
                    ErrorCode.CONFLICT,
                    f"event id {event_id} is already stored as {stored_type} in {stream_id}",
                    event_id=event_id, stream_id=stream_id,
                )
            positions.append(position)
            versions.append(version)
        results.append(AppendResult(p.stream_id, tuple(positions), max(versions), duplicate=True))
    return results


class EventStore(abc.ABC):
    """An append-only log of opaque events in versioned streams with one global order."""

    def __init__(self, *, poll_interval: float = 1.0) -> None:
        # Polling only matters for commits made by another process; ours notify directly.
        self.poll_interval = poll_interval
        self._committed = anyio.Event()
        self._closed = False

    # -- lifecycle

    async def __aenter__(self) -> "EventStore":
        await self.open()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Idempotent; the in-memory store needs nothing."""

    async def close(self) -> None:
        """Idempotent. Followers end their iteration."""
        if self._closed:
            return
        self._closed = True
        await self._close()
        self._notify()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise LamaError(ErrorCode.INTERNAL, "event store is closed")

    def _notify(self) -> None:
        # Set-and-replace broadcasts to every waiter; a waiter that grabbed the old event
        # before reading cannot miss a commit that happened after its read.
        committed, self._committed = self._committed, anyio.Event()
        committed.set()

    # -- writing

    async def append(self, stream_id: str, events: Sequence[NewEvent],
                     expected_version: int | None = ANY) -> AppendResult:
        (result,) = await self.append_batch([AppendRequest(stream_id, events, expected_version)])
        return result

    async def append_batch(self, requests: Sequence[AppendRequest]) -> list[AppendResult]:
        """Append to several streams in one transaction: all or nothing."""
        self._check_open()
        prepared = prepare(requests)
        results = await self._append(prepared)
        if not all(r.duplicate for r in results):
            self._notify()
        return results

    # -- reading

    async def read_stream(self, stream_id: str, from_version: int = 1) -> list[StoredEvent]:
        self._check_open()
        return await self._read_stream(stream_id, from_version)

    async def read_all(self, after: int = 0, limit: int | None = None) -> list[StoredEvent]:
        """Events with ``position > after``, oldest first (pass the last position you saw)."""
        self._check_open()
        return await self._read_all(after, limit)

    async def iter_all(self, after: int = 0, page_size: int = 2000) -> AsyncIterator[StoredEvent]:
        """Everything after ``after`` in pages, without holding the whole log in memory."""
        while True:
            page = await self.read_all(after, page_size)
            for ev in page:
                yield ev
            if len(page) < page_size:
                return
            after = page[-1].position

    async def follow(self, after: int = 0, page_size: int = 500) -> AsyncIterator[StoredEvent]:
        """Yield stored events after ``after``, then new ones as they commit; ends when the store closes."""
        while not self._closed:
            waiter = self._committed
            try:
                page = await self._read_all(after, page_size)
            except LamaError:
                if self._closed:  # closed while we were reading: the same as closed while waiting
                    return
                raise
            for ev in page:
                yield ev
                after = ev.position
            if page:
                continue
            with anyio.move_on_after(self.poll_interval):
                await waiter.wait()

    async def last_position(self) -> int:
        self._check_open()
        return await self._last_position()

    async def stream_version(self, stream_id: str) -> int:
        """0 when the stream has no events."""
        self._check_open()
        return await self._stream_version(stream_id)

    # -- implementation hooks

    @abc.abstractmethod
    async def _append(self, prepared: list[_Prepared]) -> list[AppendResult]: ...

    @abc.abstractmethod
    async def _read_stream(self, stream_id: str, from_version: int) -> list[StoredEvent]: ...

    @abc.abstractmethod
    async def _read_all(self, after: int, limit: int | None) -> list[StoredEvent]: ...

    @abc.abstractmethod
    async def _last_position(self) -> int: ...

    @abc.abstractmethod
    async def _stream_version(self, stream_id: str) -> int: ...

    async def _close(self) -> None:  # noqa: B027 - optional hook
        pass


class MemoryEventStore(EventStore):
    """The same contract in a list."""

    def __init__(self, *, poll_interval: float = 1.0) -> None:
        super().__init__(poll_interval=poll_interval)
        self._rows: list[StoredEvent] = []
        self._by_id: dict[str, StoredEvent] = {}
        self._streams: dict[str, list[StoredEvent]] = {}

    async def _append(self, prepared: list[_Prepared]) -> list[AppendResult]:
        # No awaits in here: on one event loop this whole block is atomic.
        stored = {
            event_id: (r.stream_id, r.version, r.position, r.type)
            for p in prepared for event_id, _, _ in p.items if (r := self._by_id.get(event_id)) is not None
        }
        dup = check_duplicates(prepared, stored)
        if dup is not None:
            return dup
        for p in prepared:
            actual = len(self._streams.get(p.stream_id, ()))
            if p.expected_version is not None and p.expected_version != actual:
                raise stream_conflict(p.stream_id, p.expected_version, actual)
        results = []
        at = now_ms()
        for p in prepared:
            stream = self._streams.setdefault(p.stream_id, [])
            positions = []
            for event_id, etype, data in p.items:
                row = StoredEvent(len(self._rows) + 1, p.stream_id, len(stream) + 1, event_id, etype, data, at)
                self._rows.append(row)
                stream.append(row)
                self._by_id[event_id] = row
                positions.append(row.position)
            results.append(AppendResult(p.stream_id, tuple(positions), len(stream)))
        return results

    async def _read_stream(self, stream_id: str, from_version: int) -> list[StoredEvent]:
        rows = self._streams.get(stream_id, [])
        return rows[max(from_version, 1) - 1:]

    async def _read_all(self, after: int, limit: int | None) -> list[StoredEvent]:
        rows = self._rows[max(after, 0):]
        if limit is not None:
            rows = rows[:limit]
        return list(rows)

    async def _last_position(self) -> int:
        return len(self._rows)

    async def _stream_version(self, stream_id: str) -> int:
        return len(self._streams.get(stream_id, ()))
