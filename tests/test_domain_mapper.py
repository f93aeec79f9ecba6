"""The domain's side of storage: every event type through ``domain.mapper`` into a store and back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from domain.events import (
    EVENT_TYPES,
    DomainEvent,
    ModelActivated,
    ModelDeactivated,
    ModelImported,
    ModelLoaded,
    ModelLoadFailed,
    ModelParametersChanged,
    ModelRemoved,
    ModelSystemPromptSet,
    ModelUnloaded,
    ModelUsed,
    TopicCreated,
    TopicMessageSeen,
    TopicModelBound,
    TopicAnalysed,
    TopicAnalysisSwitched,
    TopicReplyPosted,
    TopicSystemPromptSet,
)
from domain.mapper import Append, Keyed, append, read_all, read_stream, to_new_event
from storage.sqlite import SqliteEventStore
from storage.store import EventStore, MemoryEventStore, NewEvent
from wire.errors import ErrorCode, LamaError
from wire.messages import Timing, Usage
from wire.params import GenerationParams, ModelParams


def every_event() -> list[DomainEvent]:
    return [
        ModelImported(at=1, name="M", filename="m.gguf", model_path="/m/m.gguf", size=10, checksum="ab",
                      architecture="llama", parameter_count=7, context_length=2048, quantization="Q4_1",
                      provider="local", generation=GenerationParams(temperature=0.2, stop=["x"]),
                      load=ModelParams(context_size=512)),
        ModelParametersChanged(at=2, generation=GenerationParams(max_tokens=9), reset=True),
        ModelActivated(at=3), ModelDeactivated(at=4, reason="removed"),
        ModelLoaded(at=5, handle="h1", n_ctx=512, load_ms=1.5), ModelUnloaded(at=6, reason="idle"),
        ModelLoadFailed(at=7, code="out_of_memory", message="no"), ModelUsed(at=8), ModelRemoved(at=9),
        TopicCreated(at=10, name="T", created_by="u"), TopicModelBound(at=11, model_id="m"),
        ModelSystemPromptSet(at=11, system_prompt="Be brief."), TopicSystemPromptSet(at=11, system_prompt=None),
        TopicMessageSeen(at=12, message_id="1", author_id="u", text="hé", sent_at="2024-01-01T00:00:00Z"),
        TopicMessageSeen(at=12, message_id="0", author_id="u", text="x", sent_at="2024-01-01T00:00:00Z",
                         unanswered="cancelled"),
        TopicReplyPosted(at=13, message_id="2", reply_to="1", model_id="m", author_id="ai", text="yo",
                         sent_at="2024-01-01T00:00:01Z", thinking="hm", tokens=3, finish_reason="stop",
                         usage=Usage(1, 3, 4), timing=Timing(1.0, 2.0, 1.0, 3.0, 0.5)),
        TopicAnalysed(at=14, based_on_message_id="2", model_id="m", title="Greetings", keywords=("hi", "yo", "hé"),
                      summary="Two people say hello.", language="en", reply_count=1),
        TopicAnalysisSwitched(at=15, enabled=False),
    ]


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    backend = MemoryEventStore() if request.param == "memory" else SqliteEventStore(tmp_path / "r.db")
    async with backend as opened:
        yield opened


async def test_every_event_type_round_trips(store: EventStore):
    events = every_event()
    assert {type(e) for e in events} == set(EVENT_TYPES)  # a new event type must be added here
    assert await append(store, [Append("s", events)]) == [True]
    recorded = await read_stream(store, "s")
    assert [r.event for r in recorded] == events
    assert [r.type for r in recorded] == [e.__struct_config__.tag for e in events]
    # What the store holds is the type tag and JSON, nothing of Python's.
    raw = await store.read_stream("s")
    assert [s.type for s in raw] == [r.type for r in recorded]
    assert all(s.data.startswith(b"{") for s in raw)


async def test_keyed_events_make_a_repeated_decision_store_nothing(store: EventStore):
    decision = [Append("topic-t", [Keyed(TopicCreated(at=1), "t/created")], 0),
                Append("model-m", [Keyed(ModelUsed(at=1), "t/used")])]
    assert await append(store, decision) == [True, True]
    assert await append(store, decision) == [False, False]
    assert [(r.event_id, r.type) for r in await read_all(store)] == [("t/created", "topic.created"),
                                                                     ("t/used", "model.used")]


async def test_an_event_the_decoder_would_reject_is_refused_before_storing(store: EventStore):
    with pytest.raises(LamaError) as exc:
        await append(store, [Append("model-a", [ModelParametersChanged(
            at=1, generation=GenerationParams(temperature=9.0))])])
    assert exc.value.code is ErrorCode.BAD_REQUEST
    assert "temperature" in exc.value.message
    assert await store.last_position() == 0


def test_only_domain_events_are_mapped():
    with pytest.raises(LamaError) as exc:
        to_new_event({"type": "model.used", "at": 1})  # type: ignore[arg-type]
    assert exc.value.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(("type_", "data", "why"), [
    ("model.used", b"\xff\xfe", "cannot be read"),
    ("model.used", b'{"type":"model.nonesuch","at":1}', "cannot be read"),
    ("model.used", b'{"type":"model.used"}', "cannot be read"),
    ("topic.created", b'{"type":"model.used","at":1}', "recorded as 'topic.created'"),
])
async def test_an_unreadable_stored_event_is_internal_and_names_its_position(store: EventStore, type_: str,
                                                                             data: bytes, why: str):
    await append(store, [Append("model-a", [ModelUsed(at=1)])])
    await store.append("model-a", [NewEvent(type_, data)])
    with pytest.raises(LamaError) as exc:
        await read_all(store)
    assert exc.value.code is ErrorCode.INTERNAL
    assert exc.value.details == {"position": 2}
    assert why in exc.value.message
