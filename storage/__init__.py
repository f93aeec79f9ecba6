"""Where events are kept: an append-only store of opaque ``(type, data)`` events in versioned streams.

Knows nothing of lamabus's domain, bus or llama: what an event means is
``domain``'s business (``domain.mapper`` encodes and decodes). ``storage.store``
holds the interface and the in-memory store, ``storage.sqlite`` the durable
single-node one, ``storage.jetstream`` the one for several nodes on a NATS
cluster: the one module here that imports nats-py, and only when asked for.
``tests/test_store.py`` is the contract every backend passes.
"""

from storage.sqlite import SqliteEventStore
from storage.store import ANY, NO_STREAM, AppendRequest, AppendResult, EventStore, MemoryEventStore, NewEvent, StoredEvent

__all__ = [
    "ANY",
    "AppendRequest",
    "AppendResult",
    "EventStore",
    "JetStreamEventStore",
    "MemoryEventStore",
    "NO_STREAM",
    "NewEvent",
    "SqliteEventStore",
    "StoredEvent",
]


def __getattr__(name: str) -> object:
    # Lazy: importing storage must not import nats-py for the SQLite-only paths.
    if name == "JetStreamEventStore":
        from storage.jetstream import JetStreamEventStore

        return JetStreamEventStore
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
