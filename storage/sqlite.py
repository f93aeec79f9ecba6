"""The event store on SQLite through aiosqlite.

Durability and concurrency choices, and why:

* WAL journal: readers never block the writer and vice versa.
* ``synchronous=FULL``: a commit that returned survives power loss; the
  registry is small and rarely written, so the fsync per commit is affordable
  (``bench/bench_store.py`` measures what it costs).
* ``BEGIN IMMEDIATE``: the write lock is taken before the version check, so
  the check and the insert see the same state even with another process
  writing; ``busy_timeout`` makes that other process wait, not fail.
* Two connections: appends run on one under an in-process lock (one
  connection cannot hold two transactions), reads on the other, so a reader
  never sees a half-done transaction of ours.
* ``position INTEGER PRIMARY KEY AUTOINCREMENT``: positions are never reused,
  even after a rolled-back or deleted tail, so a follower's "after p" stays valid.
* Schema changes are numbered migrations tracked in ``PRAGMA user_version``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import aiosqlite
import anyio

from storage.store import (
    AppendResult,
    EventStore,
    StoredEvent,
    _Prepared,
    check_duplicates,
    now_ms,
)
from wire.errors import ErrorCode, LamaError, stream_conflict

# Each entry moves the schema from version i to i+1. Never edit a released entry: append one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE events (
            position    INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id    TEXT    NOT NULL UNIQUE,
            stream_id   TEXT    NOT NULL,
            version     INTEGER NOT NULL CHECK (version >= 1),
            type        TEXT    NOT NULL,
            data        BLOB    NOT NULL,
            recorded_at INTEGER NOT NULL,
            UNIQUE (stream_id, version)
        )
        """,
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# SQLite's default limit on host parameters is 32766 since 3.32; stay far below it.
_ID_CHUNK = 500


async def _connect(path: Path) -> aiosqlite.Connection:
    # isolation_level=None: we issue BEGIN IMMEDIATE/COMMIT ourselves.
    conn = aiosqlite.connect(path, isolation_level=None)
    try:
        return await conn
    except BaseException:
        # On a failed connect aiosqlite stops its worker thread without waiting for it; the thread
        # then reports to the event loop, which may be closed by then. Wait for it while the loop runs.
        thread = getattr(conn, "_thread", None)
        if thread is not None and thread.is_alive():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(thread.join, 5.0)
        raise


class SqliteEventStore(EventStore):
    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 10_000,
                 poll_interval: float = 1.0) -> None:
        super().__init__(poll_interval=poll_interval)
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = anyio.Lock()
        self._read_lock = anyio.Lock()
        self._opened = False

    async def open(self) -> None:
        if self._opened:
            return
        self._check_open()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await _connect(self.path)
            await self._pragmas(self._writer)
            await self._writer.execute("PRAGMA journal_mode=WAL")
            await self._migrate(self._writer)
            self._reader = await _connect(self.path)
            await self._pragmas(self._reader)
            await self._reader.execute("PRAGMA query_only=ON")
        except BaseException:
            await self._close()
            self._closed = True
            raise
        self._opened = True

    async def _pragmas(self, db: aiosqlite.Connection) -> None:
        await db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        await db.execute("PRAGMA synchronous=FULL")

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        await db.execute("BEGIN IMMEDIATE")
        try:
            async with db.execute("PRAGMA user_version") as cur:
                (current,) = await cur.fetchone()  # type: ignore[misc]
            if current > SCHEMA_VERSION:
                raise LamaError(
                    ErrorCode.INTERNAL,
                    f"{self.path} has schema version {current}, newer than this lamabus knows ({SCHEMA_VERSION}); "
                    "upgrade lamabus or use another data directory",
                    path=str(self.path), schema_version=current, supported=SCHEMA_VERSION,
                )
            for version in range(current, SCHEMA_VERSION):
                for statement in MIGRATIONS[version]:
                    await db.execute(statement)
            if current != SCHEMA_VERSION:
                await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise

    async def schema_version(self) -> int:
        self._check_open()
        async with self._read_lock:
            async with self._db(self._reader).execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
        return int(row[0]) if row else 0

    def _db(self, db: aiosqlite.Connection | None) -> aiosqlite.Connection:
        if db is None:
            raise LamaError(ErrorCode.INTERNAL, "event store is not open; use 'async with' or await open()")
        return db

    async def _close(self) -> None:
        # Taking both locks lets an in-flight append or read finish before the connections go.
        async with self._write_lock, self._read_lock:
            for attr in ("_reader", "_writer"):
                db = getattr(self, attr)
                setattr(self, attr, None)
                if db is not None:
                    await db.close()

    async def _append(self, prepared: list[_Prepared]) -> list[AppendResult]:
        async with self._write_lock:
            db = self._db(self._writer)
            await db.execute("BEGIN IMMEDIATE")
            try:
                results = await self._append_in_tx(db, prepared)
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            if results[0].duplicate:
                await db.execute("ROLLBACK")
            else:
                await db.execute("COMMIT")
            return results

    async def _append_in_tx(self, db: aiosqlite.Connection, prepared: list[_Prepared]) -> list[AppendResult]:
        ids = [event_id for p in prepared for event_id, _, _ in p.items]
        stored: dict[str, tuple[str, int, int, str]] = {}
        for i in range(0, len(ids), _ID_CHUNK):
            chunk = ids[i:i + _ID_CHUNK]
            marks = ",".join("?" * len(chunk))
            async with db.execute(
                f"SELECT event_id, stream_id, version, position, type FROM events WHERE event_id IN ({marks})", chunk,
            ) as cur:
                for event_id, stream_id, version, position, etype in await cur.fetchall():
                    stored[event_id] = (stream_id, version, position, etype)
        dup = check_duplicates(prepared, stored)
        if dup is not None:
            return dup
        actual: dict[str, int] = {}
        for p in prepared:
            actual[p.stream_id] = await self._version_on(db, p.stream_id)
            if p.expected_version is not None and p.expected_version != actual[p.stream_id]:
                raise stream_conflict(p.stream_id, p.expected_version, actual[p.stream_id])
        at = now_ms()
        results = []
        for p in prepared:
            base = actual[p.stream_id]
            rows = [(event_id, p.stream_id, base + i + 1, etype, data, at)
                    for i, (event_id, etype, data) in enumerate(p.items)]
            try:
                await db.executemany(
                    "INSERT INTO events (event_id, stream_id, version, type, data, recorded_at) VALUES (?,?,?,?,?,?)",
                    rows,
                )
            except sqlite3.IntegrityError as exc:
                # Only reachable if a writer bypassed BEGIN IMMEDIATE; still a concurrency conflict.
                raise LamaError(ErrorCode.CONFLICT, f"concurrent append to {p.stream_id}: {exc}",
                                stream_id=p.stream_id) from exc
            last = base + len(rows)
            async with db.execute(
                "SELECT position FROM events WHERE stream_id = ? AND version > ? AND version <= ? ORDER BY version",
                (p.stream_id, base, last),
            ) as cur:
                positions = tuple(r[0] for r in await cur.fetchall())
            results.append(AppendResult(p.stream_id, positions, last))
        return results

    @staticmethod
    async def _version_on(db: aiosqlite.Connection, stream_id: str) -> int:
        async with db.execute("SELECT max(version) FROM events WHERE stream_id = ?", (stream_id,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    _COLUMNS = "position, stream_id, version, event_id, type, data, recorded_at"

    async def _select(self, sql: str, params: Sequence[object]) -> list[StoredEvent]:
        async with self._read_lock:
            async with self._db(self._reader).execute(sql, params) as cur:
                rows = await cur.fetchall()
        return [StoredEvent(*r) for r in rows]

    async def _read_stream(self, stream_id: str, from_version: int) -> list[StoredEvent]:
        return await self._select(
            f"SELECT {self._COLUMNS} FROM events WHERE stream_id = ? AND version >= ? ORDER BY version",
            (stream_id, from_version),
        )

    async def _read_all(self, after: int, limit: int | None) -> list[StoredEvent]:
        return await self._select(
            f"SELECT {self._COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?",
            (after, -1 if limit is None else limit),
        )

    async def _last_position(self) -> int:
        async with self._read_lock:
            async with self._db(self._reader).execute("SELECT max(position) FROM events") as cur:
                row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def _stream_version(self, stream_id: str) -> int:
        async with self._read_lock:
            return await self._version_on(self._db(self._reader), stream_id)

    def file_size(self) -> int:
        """Bytes on disk, WAL included (what the registry costs in the data directory)."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        return total
