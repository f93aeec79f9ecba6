"""KV states of sequences that lost their slot: kept in host RAM and on disk, restored when they return.

A worker's context holds ``n_seq_max`` sequences. When a topic's slot is given to another
topic, its KV cells (llama.cpp ``llama_state_seq_get_data``) are saved here under the exact
tokens they hold; when a prompt comes whose start matches saved tokens, the state is put
back (``llama_state_seq_set_data``) and only what follows is evaluated. llama-server's
host-memory prompt cache (``--cache-ram``) is the model for this.

Two layers, both least-recently-used and bounded in bytes:

* RAM (:class:`KvStates` ``ram_bytes``): states as they came out of llama.cpp, one buffer each.
* disk (``disk_bytes``): the same states under ``<data_dir>/kv-cache/<model key>/``, written by one
  background thread (never on the token path; a backlog beyond :data:`MAX_WRITE_BACKLOG`
  drops writes rather than wait), read by the same thread when a prompt matches a file, so the
  main loop never waits on a disk. A file is checked on read (magic, model key, token hash,
  length, CRC-32): a truncated, corrupt or foreign file is deleted and counted, never restored.

Every state is keyed by the model and its load parameters (the directory) and by its exact tokens
(the file name); the keys and the file format are engine/kv_files.py's. A model file that changes
gets another directory; the old one ages out of the disk bound.

Nothing here imports llama: the worker passes buffers in and gets buffers out (anything with
the buffer protocol), so this is tested without a model (tests/test_kv_cache_units.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.kv_files import SUFFIX, BadFile, common_prefix_bytes, encode_header, read_header, state_key

log = logging.getLogger("engine.kv_cache")

#: States shorter than this are not worth a save (the system prompt alone is re-evaluated in ms).
MIN_TOKENS = 32
#: A restore must win at least this many tokens over what the slot already holds.
MIN_GAIN = 16
#: Bytes of states waiting for the disk thread beyond which a new write is dropped, not waited for.
MAX_WRITE_BACKLOG = 256 << 20


# ---- entries --------------------------------------------------------------------------------


class Entry:
    """One saved state: its tokens, and its bytes when they are in memory."""

    __slots__ = ("key", "tokens", "n_tokens", "data", "size", "conversation", "used")

    def __init__(self, key: str, tokens: bytes, data: Any, size: int, conversation: str | None) -> None:
        self.used = 0.0  # on disk: when last written or restored (wall clock, as file mtimes are)
        self.key = key
        self.tokens = tokens  # int32 block
        self.n_tokens = len(tokens) // 4
        self.data = data  # a buffer (RAM), or None (on disk only)
        self.size = size
        self.conversation = conversation


class Found:
    """The best saved state for a prompt. ``ready``: its bytes are in memory (restore now);
    otherwise the disk thread is reading it and the prompt should wait for it (``KvStates.find``
    again after the worker is woken)."""

    __slots__ = ("entry", "prefix", "ready")

    def __init__(self, entry: Entry, prefix: int, ready: bool) -> None:
        self.entry = entry
        self.prefix = prefix
        self.ready = ready


# ---- the store ------------------------------------------------------------------------------


class KvStates:
    """The RAM and disk layers of one worker (one model, one load configuration). Main-thread API:
    :meth:`find`, :meth:`take`, :meth:`save`, :meth:`stats`, :meth:`close`. The disk thread calls
    ``wake`` when a read finishes, so a main loop blocked on its command queue looks again."""

    def __init__(
        self,
        *,
        ram_bytes: int,
        disk_bytes: int = 0,
        disk_root: str | os.PathLike[str] | None = None,
        dir_key: str = "",
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.ram_bytes = max(0, ram_bytes)
        self.disk_bytes = max(0, disk_bytes) if disk_root is not None and dir_key else 0
        self.dir_key = dir_key
        self.dir = Path(disk_root) / dir_key if self.disk_bytes else None
        self.wake = wake
        self.ram: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self.ram_used = 0
        self.disk: OrderedDict[str, Entry] = OrderedDict()  # the files (data None), oldest first
        self.disk_used = 0
        self.fetched: dict[str, Entry] = {}  # read from disk, waiting for their prompt (outside the RAM bound)
        self._reading: set[str] = set()
        # finished reads: (key, the entry, or None and whether the file was bad)
        self._done: queue.SimpleQueue[tuple[str, Entry | None, bool]] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._backlog = 0
        self._lock = threading.Lock()  # guards the disk index between the two threads
        # other models' and configurations' files under the same root: (mtime, size, path), oldest first,
        # so that the disk bound holds for the whole root, least recently used first
        self._others: list[tuple[float, int, Path]] = []
        self._others_used = 0
        self.hits = self.misses = self.restored_tokens = 0
        self.saved = self.disk_writes = self.disk_reads = self.bad_files = self.dropped_writes = 0
        self._thread: threading.Thread | None = None
        if self.dir is not None:
            try:
                self._open_disk()
            except OSError as exc:
                log.warning("KV states on disk are off: %s: %s", self.dir, exc)
                self.dir, self.disk_bytes = None, 0
            else:
                self._thread = threading.Thread(target=self._disk_loop, name="engine-kv-disk", daemon=True)
                self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.ram_bytes > 0 or self.disk_bytes > 0

    # ---- main thread ----------------------------------------------------------------------

    def find(self, tokens: bytes, better_than: int) -> Found | None:
        """The saved state that restores the longest start of ``tokens``, if it beats ``better_than``
        (what the slot already holds) by :data:`MIN_GAIN`. A state only on disk starts its read."""
        self._collect()
        best: Entry | None = None
        best_n = better_than + MIN_GAIN - 1
        ready = False
        for layer, in_memory in ((self.fetched, True), (self.ram, True), (self.disk, False)):
            with self._lock if layer is self.disk else contextlib.nullcontext():
                for e in layer.values():
                    n = common_prefix_bytes(e.tokens, tokens)
                    if n > best_n:
                        best, best_n, ready = e, n, in_memory
        if best is None:
            return None
        if not ready and best.key not in self._reading:
            self._reading.add(best.key)
            self._jobs.put(("read", best))
        return Found(best, best_n, ready)

    def reading(self, key: str) -> bool:
        """Whether the disk thread is still reading state ``key`` (cheap: no search)."""
        self._collect()
        return key in self._reading

    def take(self, found: Found) -> Any:
        """The bytes of a ready state, to restore. It leaves RAM (its slot holds it now, and saves it
        again when evicted); the disk copy stays, most recently used."""
        e = found.entry
        if self.fetched.pop(e.key, None) is None and self.ram.pop(e.key, None) is not None:
            self.ram_used -= e.size
        with self._lock:
            on_disk = self.disk.get(e.key)
            if on_disk is not None:
                on_disk.used = time.time()
                self.disk.move_to_end(e.key)
                self._jobs.put(("touch", e.key))
        return e.data

    def discard(self, found: Found) -> None:
        """llama.cpp refused a state that passed every check here: it is of no use, on disk either."""
        self.bad_files += 1
        key = found.entry.key
        self.fetched.pop(key, None)
        e = self.ram.pop(key, None)
        if e is not None:
            self.ram_used -= e.size
        self._jobs.put(("delete", key))

    def counted(self, hit: bool, restored: int = 0) -> None:
        if hit:
            self.hits += 1
            self.restored_tokens += restored
        else:
            self.misses += 1

    def save(self, tokens: bytes, data: Any, conversation: str | None) -> None:
        """Keep a state that left its slot: in RAM (evicting the least recently used) and on disk."""
        size = memoryview(data).nbytes
        key = state_key(tokens)
        self.saved += 1
        self._forget_prefixes(tokens)
        e = Entry(key, tokens, data, size, conversation)
        if size <= self.ram_bytes:
            old = self.ram.pop(key, None)
            if old is not None:
                self.ram_used -= old.size
            self.ram[key] = e
            self.ram_used += size
            while self.ram_used > self.ram_bytes:
                _, gone = self.ram.popitem(last=False)
                self.ram_used -= gone.size
        if self.dir is not None and size <= self.disk_bytes:
            with self._lock:
                on_disk = key in self.disk
                full = self._backlog + size > MAX_WRITE_BACKLOG
                if not on_disk and not full:
                    self._backlog += size
            if on_disk:
                self._jobs.put(("touch", key))
            elif full:
                self.dropped_writes += 1
            else:
                self._jobs.put(("write", e))

    def _forget_prefixes(self, tokens: bytes) -> None:
        """States whose tokens ``tokens`` continues are superseded: the topic has moved on."""
        n = len(tokens)
        for key in [k for k, e in self.ram.items() if len(e.tokens) <= n and tokens.startswith(e.tokens)]:
            self.ram_used -= self.ram.pop(key).size
        with self._lock:
            stale = [k for k, e in self.disk.items() if len(e.tokens) < n and tokens.startswith(e.tokens)]
        for key in stale:
            self._jobs.put(("delete", key))

    def _collect(self) -> None:
        while True:
            try:
                key, e, bad = self._done.get_nowait()
            except queue.Empty:
                return
            self._reading.discard(key)
            if e is not None:
                self.fetched[key] = e
                while len(self.fetched) > 8:  # never asked for again: drop the oldest
                    self.fetched.pop(next(iter(self.fetched)))
            self.bad_files += bad

    def stats(self) -> dict[str, int]:
        self._collect()
        with self._lock:
            disk_entries, disk_used = len(self.disk), self.disk_used
        return {
            "ramBytes": self.ram_used + sum(e.size for e in self.fetched.values()),
            "ramEntries": len(self.ram),
            "ramLimit": self.ram_bytes,
            "diskBytes": disk_used,
            "diskEntries": disk_entries,
            "diskLimit": self.disk_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "restoredTokens": self.restored_tokens,
            "saved": self.saved,
            "diskWrites": self.disk_writes,
            "diskReads": self.disk_reads,
            "badFiles": self.bad_files,
            "droppedWrites": self.dropped_writes,
        }

    def close(self, timeout: float = 5.0) -> None:
        """Finish the queued writes (bounded by ``timeout``) and stop the disk thread."""
        if self._thread is None:
            return
        self._jobs.put(None)
        self._thread.join(timeout)
        self._thread = None

    # ---- disk thread ----------------------------------------------------------------------

    def _open_disk(self) -> None:
        """Index the root: headers only (the whole file is checked when it is read). Leftovers of a
        killed writer and files that fail the header check are deleted; then the oldest files go
        until the root is within the bound."""
        assert self.dir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        found: list[Entry] = []
        for d in self.dir.parent.iterdir():
            if not d.is_dir():
                continue
            for p in d.iterdir():
                if p.name.endswith(".tmp"):
                    if d == self.dir and not _writer_alive(p.name):
                        _unlink(p)
                    continue
                if not p.name.endswith(SUFFIX):
                    continue
                try:
                    st = p.stat()
                except OSError:
                    continue
                if d != self.dir:
                    self._others.append((st.st_mtime, st.st_size, p))
                    continue
                try:
                    with open(p, "rb") as f:
                        tokens, _, _, _ = read_header(f, self.dir_key, st.st_size, p.name[: -len(SUFFIX)])
                except BadFile as exc:
                    log.warning("KV state file %s ignored and deleted: %s", p, exc)
                    self.bad_files += 1
                    _unlink(p)
                    continue
                except OSError:
                    continue
                e = Entry(p.name[: -len(SUFFIX)], tokens, None, st.st_size, None)
                e.used = st.st_mtime
                found.append(e)
        for e in sorted(found, key=lambda e: e.used):
            self.disk[e.key] = e
            self.disk_used += e.size
        self._others.sort(key=lambda x: x[0])
        self._others_used = sum(size for _, size, _ in self._others)
        for path in self._shrink(0):
            _unlink(path)

    def _shrink(self, room: int) -> list[Path]:
        """Drop index entries, least recently used first over the whole root, until ``room`` more bytes
        fit; returns the files to delete. Under ``_lock``, or
        before the disk thread starts."""
        gone: list[Path] = []
        while self.disk_used + self._others_used + room > self.disk_bytes:
            own = next(iter(self.disk.values()), None)
            other = self._others[0] if self._others else None
            if own is None and other is None:
                break
            if other is not None and (own is None or other[0] <= own.used):
                self._others.pop(0)
                self._others_used -= other[1]
                gone.append(other[2])
            else:
                assert own is not None
                del self.disk[own.key]
                self.disk_used -= own.size
                gone.append(self._path(own.key))
        return gone

    def _path(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / (key + SUFFIX)

    def _disk_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            what, arg = job
            try:
                if what == "write":
                    self._write(arg)
                elif what == "read":
                    self._read(arg)
                elif what == "touch":
                    os.utime(self._path(arg))
                elif what == "delete":
                    self._delete(arg)
            except Exception as exc:  # a full disk, a removed directory: the cache is best effort
                log.warning("KV state %s of %s failed: %r", what, arg if isinstance(arg, str) else arg.key, exc)
                if what == "read":  # not offered again: a state that cannot be read is no use
                    self._delete(arg.key)
                    self._done.put((arg.key, None, False))
                    self.wake()
            finally:
                if what == "write":
                    with self._lock:
                        self._backlog -= arg.size

    def _write(self, e: Entry) -> None:
        path = self._path(e.key)
        tmp = path.with_name(f"{e.key}.{os.getpid()}.tmp")
        header = encode_header(self.dir_key, e.tokens, e.data)
        size = len(header) + len(e.tokens) + e.size
        with self._lock:
            gone = self._shrink(size)
        for p in gone:
            _unlink(p)
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(e.tokens)
            f.write(e.data)
        os.replace(tmp, path)
        on_disk = Entry(e.key, e.tokens, None, size, e.conversation)
        on_disk.used = time.time()
        with self._lock:
            old = self.disk.pop(e.key, None)
            if old is not None:
                self.disk_used -= old.size
            self.disk[e.key] = on_disk
            self.disk_used += size
        self.disk_writes += 1

    def _delete(self, key: str) -> None:
        with self._lock:
            e = self.disk.pop(key, None)
            if e is not None:
                self.disk_used -= e.size
        _unlink(self._path(key))

    def _read(self, e: Entry) -> None:
        path = self._path(e.key)
        try:
            try:
                f = open(path, "rb")
            except FileNotFoundError:  # made room for a newer state since it was found
                self._done.put((e.key, None, False))
                self.wake()
                return
            with f:
                size = os.fstat(f.fileno()).st_size
                tokens, n_bytes, offset, crc = read_header(f, self.dir_key, size, e.key)
                data = bytearray(n_bytes)
                if f.readinto(data) != n_bytes:
                    raise BadFile("truncated in its state")
                if zlib.crc32(data, zlib.crc32(tokens)) != crc:
                    raise BadFile("checksum mismatch")
        except BadFile as exc:
            log.warning("KV state file %s ignored and deleted: %s", path, exc)
            self._delete(e.key)
            self._done.put((e.key, None, True))
        else:
            self.disk_reads += 1
            self._done.put((e.key, Entry(e.key, tokens, data, n_bytes, e.conversation), False))
        self.wake()


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot delete %s: %s", p, exc)


def _writer_alive(name: str) -> bool:
    """A ``<key>.<pid>.tmp`` file belongs to a writer that may still be running."""
    parts = name.split(".")
    try:
        pid = int(parts[-2])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
