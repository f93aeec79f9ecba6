"""Projections: a rebuild from the log equals the incrementally kept state, whatever the commands were."""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.registry import Registry
from domain.events import ModelActivated, ModelImported, ModelUsed, TopicMessageSeen
from domain.mapper import RecordedEvent, read_all
from domain.projections import Projections, iso_ms
from storage.sqlite import SqliteEventStore
from storage.store import EventStore, MemoryEventStore
from tests.test_registry import Clock, chat, reply_for, write_gguf
from wire.errors import ErrorCode, LamaError
from wire.params import GenerationParams, ModelParams
from wire.records import TopicAnalysis

MODEL_IDS = ["a", "b", "c"]
TOPICS = ["t1", "t2"]
models = st.sampled_from(MODEL_IDS)
maybe_model = st.none() | models
topics = st.sampled_from(TOPICS)

command = st.one_of(
    st.tuples(st.just("import"), st.integers(0, 2), st.sampled_from([None, "A", "B", "C"])),
    st.tuples(st.just("activate"), models),
    st.tuples(st.just("deactivate"), models),
    st.tuples(st.just("params"), models, st.none() | st.floats(0, 2), st.none() | st.integers(1, 4096),
              st.none() | st.integers(64, 8192), st.booleans()),
    st.tuples(st.just("remove"), models),
    st.tuples(st.just("used"), models),
    st.tuples(st.just("loaded"), models),
    st.tuples(st.just("unloaded"), models),
    st.tuples(st.just("failed"), models),
    st.tuples(st.just("topic"), topics, maybe_model),
    st.tuples(st.just("bind"), topics, maybe_model),
    st.tuples(st.just("reply"), topics, st.integers(0, 3), models),
    st.tuples(st.just("unanswered"), topics, st.integers(0, 3)),
    st.tuples(st.just("model_prompt"), models, st.none() | st.sampled_from(["Be brief.", "Be kind."])),
    st.tuples(st.just("topic_prompt"), topics, st.none() | st.sampled_from(["Speak French.", "Rhyme."])),
    st.tuples(st.just("analysis"), topics, st.integers(0, 4), models),
    st.tuples(st.just("analysis_switch"), topics, st.booleans()),
)
# Most commands need a model: start from a registry holding some (a random subset, by random names).
setup = st.lists(st.tuples(st.just("import"), st.integers(0, 2), st.sampled_from([None, "A", "B", "C"])),
                 min_size=1, max_size=3)
commands = st.tuples(setup, st.lists(command, min_size=1, max_size=30)).map(lambda p: p[0] + p[1])

# What a command may legitimately refuse with; anything else is a bug.
EXPECTED_REFUSALS = {ErrorCode.MODEL_NOT_FOUND, ErrorCode.CONFLICT, ErrorCode.BAD_REQUEST}


async def run(reg: Registry, files: list[Path], cmd: tuple) -> None:
    kind, *args = cmd
    if kind == "import":
        await reg.import_model(files[args[0]], args[1])
    elif kind == "activate":
        await reg.activate(args[0])
    elif kind == "deactivate":
        await reg.deactivate(args[0])
    elif kind == "params":
        model_id, temperature, max_tokens, ctx, reset = args
        await reg.update_params(model_id, GenerationParams(temperature=temperature, max_tokens=max_tokens),
                                ModelParams(context_size=ctx), reset=reset)
    elif kind == "remove":
        await reg.remove(args[0])
    elif kind == "used":
        await reg.record_usage(args[0])
    elif kind == "loaded":
        await reg.record_loaded(args[0], "ctx-x", 512, 1.0)
    elif kind == "unloaded":
        await reg.record_unloaded(args[0], "idle")
    elif kind == "failed":
        await reg.record_load_failed(args[0], LamaError(ErrorCode.OUT_OF_MEMORY, "no room"))
    elif kind == "topic":
        await reg.create_topic(args[0], model_id=args[1])
    elif kind == "bind":
        await reg.bind_topic(args[0], args[1])
    elif kind == "reply":
        topic, n, model_id = args
        model = await reg.get_model(model_id)
        msg = chat(topic, f"m{n}", text=f"question {n}")
        reply, completed = reply_for(msg, model, text=f"answer {n}")
        await reg.record_reply(msg, reply, completed)
    elif kind == "unanswered":
        await reg.record_message(chat(args[0], f"m{args[1]}"), unanswered="cancelled")
    elif kind == "model_prompt":
        await reg.set_model_system_prompt(args[0], args[1])
    elif kind == "topic_prompt":
        await reg.set_topic_system_prompt(args[0], args[1])
    elif kind == "analysis":
        topic, n, model_id = args
        if topic in reg.view.topics:
            await reg.record_analysis(topic, TopicAnalysis(
                title=f"about {n}", keywords=("a", "b", f"k{n}"), summary=f"Summary {n}.", language="en",
                based_on_message_id=f"r{n}", model_id=model_id, reply_count=n, analysed_at=0))
    elif kind == "analysis_switch":
        await reg.set_topic_analysis(args[0], args[1])


async def exercise(store: EventStore, workdir: Path, cmds: list[tuple]) -> None:
    files = [write_gguf(workdir / "models" / f"{m}.gguf", salt=i) for i, m in enumerate(MODEL_IDS)]
    async with Registry(store, [workdir / "models"], clock=Clock()) as reg:
        for cmd in cmds:
            try:
                await run(reg, files, cmd)
            except LamaError as exc:
                assert exc.code in EXPECTED_REFUSALS, (cmd, exc)
        incremental = reg.view.state()
        log = await read_all(store)
        rebuilt = await Projections.rebuild(store, page_size=7)  # small pages: the paging path too
        assert rebuilt.state() == incremental
        check_invariants(reg.view, log)


def check_invariants(view: Projections, log: list[RecordedEvent]) -> None:
    active = [m.id for m in view.models.values() if m.active]
    assert active == ([view.active_model_id] if view.active_model_id else [])
    assert all(not view.models[m].deleted for m in active)
    used = Counter(e.stream_id for e in log if isinstance(e.event, ModelUsed))
    for m in view.models.values():
        assert m.usage_count == used[f"model-{m.id}"]
        assert m.version == max(e.version for e in log if e.stream_id == f"model-{m.id}")
    for topic, turns in view.history.items():
        ids = [t.message_id for t in turns if not t.is_ai]
        assert len(ids) == len(set(ids)), "a user message was recorded twice"
        replies = [t.reply_to for t in turns if t.is_ai]
        assert len(replies) == len(set(replies)), "a message got two replies"
        assert set(replies) <= set(ids)
    seen = [e for e in log if isinstance(e.event, TopicMessageSeen)]
    assert len(seen) == sum(len(s) for s in view.seen.values())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cmds=commands)
def test_rebuild_equals_incremental_in_memory(cmds):
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(exercise(MemoryEventStore(), Path(tmp), cmds))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cmds=commands)
def test_rebuild_equals_incremental_on_sqlite(cmds):
    with tempfile.TemporaryDirectory() as tmp:
        async def go() -> None:
            async with SqliteEventStore(Path(tmp) / "r.sqlite3") as store:
                await exercise(store, Path(tmp), cmds)

        asyncio.run(go())


# ----------------------------------------------------------------------------- fold details


def stored(position: int, stream: str, version: int, event) -> RecordedEvent:
    return RecordedEvent(position, stream, version, f"e{position}", event, 0)


def imported(at: int) -> ModelImported:
    return ModelImported(at=at, name="X", filename="x.gguf", model_path="/m/x.gguf", size=1, checksum="c",
                         architecture="llama", parameter_count=1)


def test_activation_is_exclusive_even_without_a_deactivation():
    # Two writers that raced may leave the old model's "deactivated" out of the log.
    view = Projections()
    view.apply(stored(1, "model-a", 1, imported(1)))
    view.apply(stored(2, "model-b", 1, imported(2)))
    view.apply(stored(3, "model-a", 2, ModelActivated(at=3)))
    view.apply(stored(4, "model-b", 2, ModelActivated(at=4)))
    assert view.active_model_id == "b"
    assert [m.id for m in view.models.values() if m.active] == ["b"]


def test_events_for_unknown_models_and_foreign_streams_are_skipped():
    view = Projections()
    view.apply(stored(1, "model-ghost", 1, ModelUsed(at=1)))
    view.apply(stored(2, "audit-x", 1, ModelUsed(at=2)))
    assert view.models == {} and view.position == 2 and view.event_count == 2


def test_applying_out_of_order_is_an_error():
    view = Projections()
    view.apply(stored(2, "model-a", 1, imported(1)))
    with pytest.raises(LamaError) as exc:
        view.apply(stored(2, "model-a", 2, ModelUsed(at=2)))
    assert exc.value.code is ErrorCode.INTERNAL


def test_a_message_in_an_unknown_topic_opens_the_room():
    view = Projections()
    view.apply(stored(1, "topic-x", 1, TopicMessageSeen(at=5, message_id="m", author_id="u", text="hi",
                                                        sent_at="2024-01-01T00:00:00Z")))
    room = view.topics["x"]
    assert (room.created, room.message_count, room.model_id) == (5, 1, None)
    assert view.has_seen("x", "m") and not view.has_replied("x", "m")


def test_iso_ms():
    assert iso_ms(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"
