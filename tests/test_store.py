"""One contract for every event store (eventsourcing style): in-memory, SQLite and JetStream all pass it.

The store is ignorant of the domain: these tests append opaque ``(type, data)`` events; the domain's
own encoding is tested through ``domain.mapper`` in ``tests/test_domain_mapper.py``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import anyio
import pytest

from storage.sqlite import SCHEMA_VERSION, SqliteEventStore
from storage.store import ANY, NO_STREAM, AppendRequest, EventStore, MemoryEventStore, NewEvent, StoredEvent
from wire.errors import ErrorCode, LamaError


def ev(type_: str = "thing.happened", at: int = 1, event_id: str | None = None) -> NewEvent:
    """An opaque event: the store must keep its type and bytes without knowing what they mean."""
    data = json.dumps({"at": at}).encode()
    return NewEvent(type_, data) if event_id is None else NewEvent(type_, data, event_id)


def used(at: int = 1, event_id: str | None = None) -> NewEvent:
    return ev("model.used", at, event_id)


def at_of(stored: StoredEvent) -> int:
    return json.loads(stored.data)["at"]


class EventStoreContract:
    """Subclasses provide ``store`` (open) and ``make_store`` (a second handle, where that means something)."""

    @pytest.fixture
    async def store(self) -> EventStore:  # pragma: no cover - overridden
        raise NotImplementedError

    async def test_versions_and_positions(self, store: EventStore):
        r1 = await store.append("model-a", [used(1), used(2)], NO_STREAM)
        r2 = await store.append("topic-t", [ev("topic.created", 3)], NO_STREAM)
        r3 = await store.append("model-a", [used(4)], 2)
        assert (r1.positions, r1.last_version) == ((1, 2), 2)
        assert (r2.positions, r2.last_version) == ((3,), 1)
        assert (r3.positions, r3.last_version) == ((4,), 3)
        stream = await store.read_stream("model-a")
        assert [(e.version, e.position, at_of(e)) for e in stream] == [(1, 1, 1), (2, 2, 2), (3, 4, 4)]
        assert [e.version for e in await store.read_stream("model-a", from_version=2)] == [2, 3]
        assert await store.stream_version("model-a") == 3
        assert await store.stream_version("model-none") == 0
        assert await store.last_position() == 4
        assert await store.read_stream("model-none") == []

    async def test_wrong_expected_version_is_a_conflict_and_writes_nothing(self, store: EventStore):
        await store.append("model-a", [used()], NO_STREAM)
        with pytest.raises(LamaError) as exc:
            await store.append("model-a", [used(), used()], 0)
        assert exc.value.code is ErrorCode.CONFLICT
        assert exc.value.details == {"stream_id": "model-a", "expected": 0, "actual": 1}
        with pytest.raises(LamaError) as exc:
            await store.append("model-a", [used()], 5)
        assert exc.value.details["actual"] == 1
        assert await store.last_position() == 1

    async def test_any_skips_the_check(self, store: EventStore):
        await store.append("model-a", [used()], ANY)
        result = await store.append("model-a", [used()])
        assert result.last_version == 2

    async def test_retry_with_same_event_ids_returns_original_positions(self, store: EventStore):
        await store.append("topic-t", [ev("topic.created", 1)])
        events = [used(2, "e-1"), used(3, "e-2")]
        first = await store.append("model-a", events, NO_STREAM)
        await store.append("model-a", [used(4)], 2)
        # The retry carries the expected version the first attempt had; it is stale now and must not matter.
        again = await store.append("model-a", events, NO_STREAM)
        assert again.positions == first.positions == (2, 3)
        assert again.duplicate and not first.duplicate
        assert again.last_version == 2
        assert await store.last_position() == 4
        assert [e.event_id for e in await store.read_all()][1:3] == ["e-1", "e-2"]

    async def test_partial_retry_is_a_conflict(self, store: EventStore):
        await store.append("model-a", [used(1, "e-1")])
        with pytest.raises(LamaError) as exc:
            await store.append("model-a", [used(1, "e-1"), used(1, "e-new")])
        assert exc.value.code is ErrorCode.CONFLICT
        assert await store.last_position() == 1

    async def test_event_id_reused_in_another_stream_is_a_conflict(self, store: EventStore):
        await store.append("model-a", [used(1, "e-1")])
        with pytest.raises(LamaError) as exc:
            await store.append("model-b", [used(1, "e-1")])
        assert exc.value.code is ErrorCode.CONFLICT
        assert exc.value.details["stream_id"] == "model-a"

    async def test_batch_is_atomic_across_streams(self, store: EventStore):
        await store.append("model-a", [ev("model.activated", 1)], NO_STREAM)
        await store.append("model-b", [used(2)], NO_STREAM)
        results = await store.append_batch([
            AppendRequest("model-a", [ev("model.deactivated", 3)], 1),
            AppendRequest("model-b", [ev("model.activated", 3)], 1),
        ])
        assert [(r.stream_id, r.positions, r.last_version) for r in results] == [
            ("model-a", (3,), 2), ("model-b", (4,), 2)]
        # Second stream's expectation is stale: the first stream's events must not land either.
        with pytest.raises(LamaError) as exc:
            await store.append_batch([
                AppendRequest("model-b", [ev("model.deactivated", 5)], 2),
                AppendRequest("model-a", [ev("model.activated", 5)], 1),
            ])
        assert exc.value.details["stream_id"] == "model-a"
        assert await store.last_position() == 4
        assert await store.stream_version("model-b") == 2

    async def test_batch_retry_is_idempotent(self, store: EventStore):
        batch = [
            AppendRequest("topic-t", [ev("topic.message_seen", 1, "t/m/seen")]),
            AppendRequest("model-a", [used(1, "t/m/used")]),
        ]
        first = await store.append_batch(batch)
        again = await store.append_batch(batch)
        assert [r.positions for r in again] == [r.positions for r in first] == [(1,), (2,)]
        assert all(r.duplicate for r in again)
        assert await store.last_position() == 2

    async def test_read_all_after_and_limit(self, store: EventStore):
        for i in range(5):
            await store.append(f"model-{i % 2}", [used(i)])
        assert [e.position for e in await store.read_all()] == [1, 2, 3, 4, 5]
        assert [e.position for e in await store.read_all(after=2)] == [3, 4, 5]
        assert [e.position for e in await store.read_all(after=1, limit=2)] == [2, 3]
        assert await store.read_all(after=5) == []
        assert [e.position async for e in store.iter_all(after=1, page_size=2)] == [2, 3, 4, 5]

    async def test_bad_requests(self, store: EventStore):
        cases = [
            lambda: store.append("model-a", []),
            lambda: store.append("", [used()]),
            lambda: store.append("model-a", [used(1, "x"), used(1, "x")]),
            lambda: store.append("model-a", [NewEvent("", b"{}")]),
            lambda: store.append("model-a", [NewEvent("t" * 201, b"{}")]),
            lambda: store.append("model-a", [NewEvent("model.used", "not bytes")]),  # type: ignore[arg-type]
            lambda: store.append("model-a", [{"type": "model.used"}]),  # type: ignore[list-item]
            lambda: store.append("model-a", [used()], -1),
            lambda: store.append_batch([AppendRequest("model-a", [used()]), AppendRequest("model-a", [used()])]),
            lambda: store.append_batch([]),
        ]
        for case in cases:
            with pytest.raises(LamaError) as exc:
                await case()
            assert exc.value.code is ErrorCode.BAD_REQUEST
        assert await store.last_position() == 0

    async def test_type_and_data_come_back_byte_for_byte(self, store: EventStore):
        # Whatever the bytes: the store never parses them (empty, binary, not UTF-8, large).
        appended = [NewEvent("a.b", b""), NewEvent("x-y_z", b"\x00\xff\xfe\x80"), NewEvent("model.used", b'{"at":1}'),
                    NewEvent("t", "héllo ✓".encode()), NewEvent("big", bytes(range(256)) * 256)]
        await store.append("s", appended)
        stored = await store.read_stream("s")
        assert [(e.type, e.data, e.event_id) for e in stored] == [(e.type, e.data, e.event_id) for e in appended]
        assert [(e.type, e.data) for e in await store.read_all()] == [(e.type, e.data) for e in appended]

    async def test_follow_yields_existing_then_new_without_polling(self, store: EventStore):
        # A poll interval no test would wait for: only the commit notification can wake the follower.
        store.poll_interval = 3600
        await store.append("model-a", [used(1)])
        got: list[int] = []
        first, done = anyio.Event(), anyio.Event()

        async def follower() -> None:
            async for ev in store.follow(after=0):
                got.append(ev.position)
                first.set()
                if len(got) == 3:
                    done.set()
                    return

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follower)
                await first.wait()
                assert got == [1]
                await store.append("model-b", [used(2), used(3)])
                await done.wait()
        assert got == [1, 2, 3]

    async def test_follow_ends_when_store_closes(self, store: EventStore):
        store.poll_interval = 3600
        ended = anyio.Event()

        async def follower() -> None:
            async for _ in store.follow():
                pass
            ended.set()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follower)
                await anyio.wait_all_tasks_blocked()
                await store.close()
                await ended.wait()

    async def test_close_is_idempotent_and_final(self, store: EventStore):
        await store.close()
        await store.close()
        assert store.closed
        with pytest.raises(LamaError) as exc:
            await store.append("model-a", [used()])
        assert exc.value.code is ErrorCode.INTERNAL
        with pytest.raises(LamaError):
            await store.read_all()

    async def test_concurrent_writers_with_same_expectation_one_wins(self, store: EventStore):
        outcomes: list[str] = []

        async def writer(i: int) -> None:
            try:
                await store.append("model-a", [used(i)], NO_STREAM)
                outcomes.append("ok")
            except LamaError as exc:
                outcomes.append(exc.code.value)

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(writer, i)
        assert sorted(outcomes) == ["conflict"] * 7 + ["ok"]
        assert await store.stream_version("model-a") == 1


class TestMemoryEventStore(EventStoreContract):
    @pytest.fixture
    async def store(self):
        async with MemoryEventStore() as store:
            yield store


class TestSqliteEventStore(EventStoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path):
        async with SqliteEventStore(tmp_path / "registry.db") as store:
            yield store

    async def test_persists_across_reopen(self, tmp_path: Path):
        path = tmp_path / "registry.db"
        async with SqliteEventStore(path) as store:
            await store.append("model-a", [used(1, "e-1")], NO_STREAM)
        async with SqliteEventStore(path) as store:
            assert [e.event_id for e in await store.read_all()] == ["e-1"]
            assert (await store.append("model-a", [used(2)], 1)).positions == (2,)
            assert await store.schema_version() == SCHEMA_VERSION

    async def test_durability_pragmas(self, tmp_path: Path):
        async with SqliteEventStore(tmp_path / "r.db") as store:
            db = store._writer
            assert db is not None
            async with db.execute("PRAGMA journal_mode") as cur:
                assert (await cur.fetchone())[0] == "wal"
            async with db.execute("PRAGMA synchronous") as cur:
                assert (await cur.fetchone())[0] == 2  # FULL
            async with db.execute("PRAGMA busy_timeout") as cur:
                assert (await cur.fetchone())[0] == store.busy_timeout_ms

    async def test_refuses_a_newer_schema(self, tmp_path: Path):
        path = tmp_path / "r.db"
        with sqlite3.connect(path) as db:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        db.close()
        store = SqliteEventStore(path)
        with pytest.raises(LamaError) as exc:
            await store.open()
        assert exc.value.code is ErrorCode.INTERNAL
        assert exc.value.details["schema_version"] == SCHEMA_VERSION + 1
        await store.close()

    async def test_unique_stream_version_is_enforced_by_the_schema(self, tmp_path: Path):
        path = tmp_path / "r.db"
        async with SqliteEventStore(path) as store:
            await store.append("model-a", [used()])
        with sqlite3.connect(path) as db, pytest.raises(sqlite3.IntegrityError):
            db.execute("INSERT INTO events (event_id, stream_id, version, type, data, recorded_at) "
                       "VALUES ('other', 'model-a', 1, 'model.used', x'7b7d', 0)")
        db.close()

    async def test_second_connection_sees_the_version_check(self, tmp_path: Path):
        # Two stores on one file behave like two processes: no shared in-process lock.
        path = tmp_path / "r.db"
        async with SqliteEventStore(path) as a, SqliteEventStore(path) as b:
            await a.append("model-a", [used(1)], NO_STREAM)
            with pytest.raises(LamaError) as exc:
                await b.append("model-a", [used(2)], NO_STREAM)
            assert exc.value.details == {"stream_id": "model-a", "expected": 0, "actual": 1}
            assert (await b.append("model-a", [used(2)], 1)).positions == (2,)

    async def test_follower_sees_other_connection_commits(self, tmp_path: Path):
        path = tmp_path / "r.db"
        async with SqliteEventStore(path, poll_interval=0.05) as a, SqliteEventStore(path) as b:
            seen: list[int] = []
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    async def follower() -> None:
                        # b's commit does not notify a: only a's poll can deliver it.
                        async for ev in a.follow():
                            seen.append(ev.position)
                            return

                    tg.start_soon(follower)
                    await anyio.wait_all_tasks_blocked()
                    await b.append("model-b", [used(3)])
            assert seen == [1]

    async def test_open_failure_leaves_nothing_open(self, tmp_path: Path):
        (tmp_path / "dir.db").mkdir()
        store = SqliteEventStore(tmp_path / "dir.db")
        with pytest.raises(Exception):
            await store.open()
        assert store.closed


class TestJetStreamEventStore(EventStoreContract):
    @pytest.fixture
    async def nc(self, nats_url: str):
        import nats

        conn = await nats.connect(nats_url)
        yield conn
        await conn.close()

    @pytest.fixture
    async def store(self, nc):
        from storage.jetstream import JetStreamEventStore

        async with JetStreamEventStore(nc, timeout=10.0) as store:
            yield store

    async def test_two_connections_racing_one_expected_version_one_wins(self, nats_url: str):
        from storage.jetstream import JetStreamEventStore

        async with JetStreamEventStore(nats_url) as a, JetStreamEventStore(nats_url) as b:
            await a.append("model-a", [used(1)], NO_STREAM)
            await b.stream_version("model-a")  # both handles now see version 1
            outcomes: dict[str, str] = {}

            async def writer(name: str, store: EventStore) -> None:
                try:
                    await store.append("model-a", [used(2, f"from-{name}")], 1)
                    outcomes[name] = "ok"
                except LamaError as exc:
                    outcomes[name] = exc.code.value
                    assert exc.details == {"stream_id": "model-a", "expected": 1, "actual": 2}

            async with anyio.create_task_group() as tg:
                tg.start_soon(writer, "a", a)
                tg.start_soon(writer, "b", b)
            assert sorted(outcomes.values()) == ["conflict", "ok"]
            (winner,) = [name for name, outcome in outcomes.items() if outcome == "ok"]
            for store in (a, b):
                assert [e.event_id for e in await store.read_stream("model-a")][1:] == [f"from-{winner}"]
                assert await store.last_position() == 2
            # The loser's rejected batch used up no sequence: positions stay gapless.
            assert (await b.append("model-b", [used(3)])).positions == (3,)

    async def test_a_close_right_after_open_ends_its_feed(self, nats_url: str, caplog: pytest.LogCaptureFixture):
        """Closed at once after opening, the feed is often still making its consumer, where nats-py or 3.11's
        wait_for can swallow the cancel; the heartbeats then kept the pump going for ever and CI's close hung
        300 s (about every second try on 3.11 before the fix). Each close must end with its feed stopped."""
        from storage.jetstream import JetStreamEventStore

        for _ in range(20):
            # An empty stream: open() has nothing to wait for, so the close meets the feed still starting.
            store = JetStreamEventStore(nats_url, stream="LAMA_CLOSE_RACE")
            await store.open()
            feed = store._feed_task
            with anyio.fail_after(10):
                await store.close()
            assert feed is not None and feed.done()
        assert not [r for r in caplog.records if "did not stop" in r.getMessage()]

    async def test_close_is_bounded_even_when_the_feed_never_stops(self, nats_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture):
        from storage import jetstream
        from storage.jetstream import JetStreamEventStore
        from tests.stubborn import SwallowsCancels

        monkeypatch.setattr(jetstream, "FEED_STOP_TIMEOUT", 0.5)
        feed = SwallowsCancels()
        monkeypatch.setattr(JetStreamEventStore, "_feed", feed.swallow_cancels)
        store = JetStreamEventStore(nats_url, stream="LAMA_CLOSE_BOUND")
        await store.open()
        stubborn = store._feed_task
        assert stubborn is not None
        with anyio.fail_after(10):
            await feed.running.wait()
            await store.close()
        assert store.closed and not stubborn.done()
        assert any("did not stop within" in r.getMessage() and "swallow_cancels" in r.getMessage()
                   for r in caplog.records)
        feed.release.set()
        with anyio.fail_after(10):
            await stubborn

    async def test_two_connections_appending_any_interleave_without_gaps_or_doubles(self, nats_url: str):
        from storage.jetstream import JetStreamEventStore

        async with JetStreamEventStore(nats_url) as a, JetStreamEventStore(nats_url) as b:
            async def writer(store: EventStore, name: str) -> None:
                for i in range(10):
                    await store.append("model-a", [used(i, f"{name}-{i}")])  # ANY: no version check

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(writer, a, "a")
                    tg.start_soon(writer, b, "b")
            for store in (a, b):
                stream = await store.read_stream("model-a")
                assert [(e.version, e.position) for e in stream] == [(i, i) for i in range(1, 21)]
                assert sorted(e.event_id for e in stream) == sorted(f"{n}-{i}" for n in "ab" for i in range(10))

    async def test_an_id_stored_by_another_connection_unseen_yet_is_still_refused(self, nats_url: str, monkeypatch):
        from storage.jetstream import JetStreamEventStore

        async with JetStreamEventStore(nats_url) as a, JetStreamEventStore(nats_url) as b:
            sync = JetStreamEventStore._sync
            stale = [b]

            async def sync_unless_stale(self):
                # b's first look misses a's commit: what a concurrent writer sees in the worst interleaving.
                if self in stale:
                    stale.remove(self)
                    return
                await sync(self)

            await a.append("model-a", [used(1, "e-1")])
            monkeypatch.setattr(JetStreamEventStore, "_sync", sync_unless_stale)
            # As if b's feed had not got there yet (it notices the gap at its next heartbeat and refills).
            for index in (b._rows, b._streams, b._by_id):
                index.clear()
            with pytest.raises(LamaError) as exc:
                # Another stream, so no fence on model-a: the broker's duplicate id check refuses it instead.
                await b.append("model-b", [used(2, "e-1")])
            assert exc.value.code is ErrorCode.CONFLICT
            assert exc.value.details["stream_id"] == "model-a"
            assert await b.last_position() == 1

    async def test_follow_on_one_connection_sees_the_others_appends(self, nats_url: str):
        from storage.jetstream import JetStreamEventStore

        async with JetStreamEventStore(nats_url) as a, JetStreamEventStore(nats_url) as b:
            a.poll_interval = 3600  # only the feed can wake a's follower: b's commit notifies b alone
            seen: list[tuple[int, str]] = []
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    async def follower() -> None:
                        async for ev in a.follow():
                            seen.append((ev.position, ev.stream_id))
                            if len(seen) == 3:
                                return

                    tg.start_soon(follower)
                    await anyio.wait_all_tasks_blocked()
                    await b.append("model-b", [used(1), used(2)], NO_STREAM)
                    await b.append("topic-t", [ev("topic.created", 3)], NO_STREAM)
            assert seen == [(1, "model-b"), (2, "model-b"), (3, "topic-t")]

    async def test_persists_across_reopen(self, nats_url: str):
        from storage.jetstream import JetStreamEventStore

        async with JetStreamEventStore(nats_url) as store:
            await store.append("model-a", [used(1, "e-1")], NO_STREAM)
        async with JetStreamEventStore(nats_url) as store:
            assert [e.event_id for e in await store.read_all()] == ["e-1"]
            assert (await store.append("model-a", [used(2)], 1)).positions == (2,)
            # A retry of the first append, long after: the original position, nothing stored.
            again = await store.append("model-a", [used(1, "e-1")], NO_STREAM)
            assert again.duplicate and again.positions == (1,)
            assert await store.last_position() == 2

    async def test_retry_is_idempotent_beyond_the_duplicate_window(self, nats_url: str):
        import nats

        from storage.jetstream import JetStreamEventStore

        # A stream whose broker-side de-duplication forgets after 100 ms: the store must not rely on it.
        nc = await nats.connect(nats_url)
        try:
            resp = await nc.request("$JS.API.STREAM.CREATE.LAMA_REGISTRY", (
                b'{"name":"LAMA_REGISTRY","subjects":["lama.registry.log.*"],"storage":"file",'
                b'"allow_atomic":true,"duplicate_window":100000000}'), timeout=5)
            assert b'"error"' not in resp.data, resp.data
            async with JetStreamEventStore(nc) as store:
                first = await store.append("model-a", [used(1, "e-1"), used(2, "e-2")])
                await store.append("model-b", [used(3)])
                # Time itself is what this test needs to pass, not another task: wait out the window.
                await anyio.sleep(0.3)
                last = await store.last_position()
                again = await store.append("model-a", [used(1, "e-1"), used(2, "e-2")])
                assert again.duplicate and again.positions == first.positions == (1, 2)
                assert await store.last_position() == last
        finally:
            await nc.close()

    async def test_a_commit_whose_ack_is_lost_is_found_not_written_twice(self, store, monkeypatch):
        from storage.jetstream import _Outcome

        publish = type(store)._publish
        calls: list[int] = []

        async def lose_the_first_ack(self, messages):
            outcome = await publish(self, messages)
            calls.append(outcome.last_seq)
            return _Outcome(error={"description": "no reply to the batch commit"}) if len(calls) == 1 else outcome

        monkeypatch.setattr(type(store), "_publish", lose_the_first_ack)
        result = await store.append("model-a", [used(1), used(2)], NO_STREAM)
        assert calls == [2]  # committed once; the store looked again instead of sending it twice
        assert result.positions == (1, 2) and result.last_version == 2
        assert not result.duplicate  # this call did write them
        assert await store.last_position() == 2

    async def test_stream_ids_with_subject_characters_round_trip(self, store: EventStore):
        odd = ["model-a.b", "topic-*", "x >y", "é~7E", "~", "a" * 200]
        for i, sid in enumerate(odd):
            await store.append(sid, [used(i)], NO_STREAM)
        assert [e.stream_id for e in await store.read_all()] == odd
        for sid in odd:
            assert await store.stream_version(sid) == 1
        assert await store.stream_version("model-a") == 0
