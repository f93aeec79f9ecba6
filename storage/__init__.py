"""The registry's storage: an append-only event store on SQLite and the projections built from it.

Knows nothing of lamabus's bus or of llama. ``storage.store`` holds the
interface and the in-memory store, ``storage.sqlite`` the durable one,
``storage.events`` the domain events, ``storage.projections`` the read models
(the seed's ``LLM`` record, topic rooms, conversations). ``storage.jetstream``
is the store for several nodes on a NATS cluster: the one module here that
imports nats-py, and only when asked for.
"""

from storage.events import AnyEvent, DomainEvent, model_stream, topic_stream
from storage.projections import LLM, Projections, RegistryState, TopicRoom, Turn
from storage.sqlite import SqliteEventStore
from storage.store import ANY, NO_STREAM, AppendRequest, AppendResult, EventStore, MemoryEventStore, NewEvent, StoredEvent

__all__ = [
    "ANY",
    "AnyEvent",
    "AppendRequest",
    "AppendResult",
    "DomainEvent",
    "EventStore",
    "JetStreamEventStore",
    "LLM",
    "MemoryEventStore",
    "NO_STREAM",
    "NewEvent",
    "Projections",
    "RegistryState",
    "SqliteEventStore",
    "StoredEvent",
    "TopicRoom",
    "Turn",
    "model_stream",
    "topic_stream",
]


def __getattr__(name: str) -> object:
    # Lazy: importing storage must not import nats-py for the SQLite-only paths.
    if name == "JetStreamEventStore":
        from storage.jetstream import JetStreamEventStore

        return JetStreamEventStore
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
