"""engine/kv_cache.py without a model: the RAM and disk layers, the file checks, the model hash memo."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from engine import kv_files
from engine.kv_cache import MIN_GAIN, KvStates
from engine.kv_files import SUFFIX, common_prefix_bytes, model_sha256, state_key, tokens_bytes

KEY = "a" * 32


def toks(*parts: range | list[int]) -> bytes:
    out: list[int] = []
    for p in parts:
        out.extend(p)
    return tokens_bytes(out)


def state(n: int, fill: int) -> bytearray:
    return bytearray([fill % 256]) * n


class Woken:
    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self) -> None:
        self.event.set()

    def wait(self) -> None:
        assert self.event.wait(10), "the disk thread never reported"
        self.event.clear()


def disk_states(root: Path, *, ram: int = 0, disk: int = 1 << 20, key: str = KEY) -> tuple[KvStates, Woken]:
    woken = Woken()
    return KvStates(ram_bytes=ram, disk_bytes=disk, disk_root=root, dir_key=key, wake=woken), woken


def test_common_prefix_matches_the_plain_loop() -> None:
    rng = random.Random(7)
    for _ in range(300):
        a = [rng.randrange(4) for _ in range(rng.randrange(0, 60))]
        b = a[: rng.randrange(0, len(a) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(0, 10))]
        want = 0
        while want < min(len(a), len(b)) and a[want] == b[want]:
            want += 1
        assert common_prefix_bytes(tokens_bytes(a), tokens_bytes(b)) == want


def test_ram_layer_is_lru_bounded_and_finds_the_longest_prefix() -> None:
    kv = KvStates(ram_bytes=250)
    a, b, c = toks(range(0, 100)), toks(range(0, 40), range(500, 560)), toks(range(1000, 1100))
    kv.save(a, state(100, 1), "A")
    kv.save(b, state(100, 2), "B")
    assert kv.stats()["ramBytes"] == 200
    kv.save(c, state(100, 3), "C")  # over 250: A, the least recently used, goes
    assert kv.stats()["ramBytes"] == 200 and kv.stats()["ramEntries"] == 2
    assert kv.find(toks(range(0, 100), [7, 7]), better_than=0) is not None
    found = kv.find(toks(range(0, 100), [7, 7]), better_than=0)
    assert found is not None and found.entry.conversation == "B" and found.prefix == 40 and found.ready
    # what the slot already holds must be beaten by MIN_GAIN
    assert kv.find(toks(range(0, 100)), better_than=40 - MIN_GAIN + 1) is None
    data = kv.take(found)
    assert bytes(data) == bytes(state(100, 2))
    assert kv.stats()["ramEntries"] == 1  # it lives in its slot now
    kv.counted(True, 40)
    kv.counted(False)
    s = kv.stats()
    assert (s["hits"], s["misses"], s["restoredTokens"]) == (1, 1, 40)


def test_a_continued_conversation_supersedes_its_shorter_states() -> None:
    kv = KvStates(ram_bytes=10_000)
    kv.save(toks(range(0, 50)), state(10, 1), "A")
    kv.save(toks(range(0, 80)), state(10, 2), "A")
    assert kv.stats()["ramEntries"] == 1
    found = kv.find(toks(range(0, 50), [1]), better_than=0)
    assert found is not None and bytes(kv.take(found)) == bytes(state(10, 2))


def test_an_entry_larger_than_the_ram_bound_is_not_kept() -> None:
    kv = KvStates(ram_bytes=50)
    kv.save(toks(range(0, 50)), state(100, 1), "A")
    assert kv.stats()["ramBytes"] == 0 and kv.find(toks(range(0, 60)), better_than=0) is None


def test_disk_layer_survives_a_restart_and_reads_in_the_background(tmp_path: Path) -> None:
    kv, _ = disk_states(tmp_path)
    t = toks(range(0, 64))
    kv.save(t, state(4096, 5), "A")
    kv.close()  # finishes the queued write
    files = list((tmp_path / KEY).glob("*" + SUFFIX))
    assert [f.name for f in files] == [state_key(t) + SUFFIX]

    kv2, woken = disk_states(tmp_path)
    try:
        assert kv2.stats()["diskEntries"] == 1
        found = kv2.find(toks(range(0, 64), [9, 9, 9]), better_than=0)
        assert found is not None and not found.ready and found.prefix == 64
        woken.wait()
        found = kv2.find(toks(range(0, 64), [9, 9, 9]), better_than=0)
        assert found is not None and found.ready
        assert bytes(kv2.take(found)) == bytes(state(4096, 5))
        assert kv2.stats()["diskReads"] == 1
    finally:
        kv2.close()


def _one_file(tmp_path: Path, key: str = KEY) -> Path:
    kv, _ = disk_states(tmp_path, key=key)
    kv.save(toks(range(0, 64)), state(4096, 5), "A")
    kv.close()
    (f,) = (tmp_path / key).glob("*" + SUFFIX)
    return f


def test_a_truncated_file_is_deleted_when_indexed(tmp_path: Path) -> None:
    f = _one_file(tmp_path)
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    kv, _ = disk_states(tmp_path)
    try:
        s = kv.stats()
        assert (s["diskEntries"], s["badFiles"]) == (0, 1)
        assert not f.exists()
        assert kv.find(toks(range(0, 64), [1]), better_than=0) is None
    finally:
        kv.close()


def test_a_corrupt_state_is_deleted_when_read_never_restored(tmp_path: Path) -> None:
    f = _one_file(tmp_path)
    with open(f, "r+b") as fh:  # same length, one byte of the state flipped: only the CRC sees it
        fh.seek(-10, os.SEEK_END)
        b = fh.read(1)
        fh.seek(-10, os.SEEK_END)
        fh.write(bytes([b[0] ^ 0xFF]))
    kv, woken = disk_states(tmp_path)
    try:
        found = kv.find(toks(range(0, 64), [1]), better_than=0)
        assert found is not None and not found.ready
        woken.wait()
        assert kv.find(toks(range(0, 64), [1]), better_than=0) is None
        s = kv.stats()
        assert (s["badFiles"], s["diskEntries"], s["diskReads"]) == (1, 0, 0)
        assert not f.exists()
    finally:
        kv.close()


@pytest.mark.parametrize("kind", ["other model", "random bytes", "empty", "renamed"])
def test_a_foreign_file_is_deleted(tmp_path: Path, kind: str) -> None:
    mine = tmp_path / KEY
    mine.mkdir()
    if kind == "other model":
        other = _one_file(tmp_path / "elsewhere", key="b" * 32)
        target = mine / other.name
        target.write_bytes(other.read_bytes())
    elif kind == "random bytes":
        target = mine / ("c" * 40 + SUFFIX)
        target.write_bytes(os.urandom(5000))
    elif kind == "empty":
        target = mine / ("d" * 40 + SUFFIX)
        target.write_bytes(b"")
    else:
        f = _one_file(tmp_path)
        target = f.with_name("e" * 40 + SUFFIX)
        f.rename(target)
    kv, _ = disk_states(tmp_path)
    try:
        assert not target.exists()
        assert kv.stats()["badFiles"] == 1 and kv.stats()["diskEntries"] == 0
    finally:
        kv.close()


def test_disk_is_bounded_oldest_first_across_model_directories(tmp_path: Path) -> None:
    old = _one_file(tmp_path, key="b" * 32)
    os.utime(old, (1, 1))  # long unused
    size = old.stat().st_size
    kv, _ = disk_states(tmp_path, disk=3 * size)
    try:
        for i in range(4):
            kv.save(toks(range(100 * i, 100 * i + 64)), state(4096, i), None)
    finally:
        kv.close()
    mine = sorted(p.name for p in (tmp_path / KEY).glob("*" + SUFFIX))
    assert not old.exists()  # the least recently used file of the whole root went first: another model's
    assert len(mine) == 3  # then this model's oldest
    assert state_key(toks(range(0, 64))) + SUFFIX not in mine
    total = sum(p.stat().st_size for p in tmp_path.rglob("*" + SUFFIX))
    assert total <= 3 * size


def test_leftover_temporary_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    d = tmp_path / KEY
    d.mkdir()
    dead = d / f"{'f' * 40}.999999999.tmp"
    dead.write_bytes(b"half")
    kv, _ = disk_states(tmp_path)
    kv.close()
    assert not dead.exists()


def test_an_unwritable_directory_turns_the_disk_layer_off(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    kv = KvStates(ram_bytes=100, disk_bytes=1000, disk_root=blocker, dir_key=KEY)
    assert kv.stats()["diskLimit"] == 0 and kv.enabled
    kv.close()


def test_model_hash_is_remembered_by_size_and_mtime(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 1000)
    first = model_sha256(str(model), tmp_path / "cache")
    kv_files._hashed.clear()  # a new process: only the file under the cache root remembers
    st = model.stat()
    model.write_bytes(b"y" * 1000)  # same size, mtime put back: the remembered hash answers
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_sha256(str(model), tmp_path / "cache") == first
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed file: hashed again
    second = model_sha256(str(model), tmp_path / "cache")
    assert second != first
    import hashlib

    assert second == hashlib.sha256(b"y" * 1000).hexdigest()


def test_the_scheduler_hands_a_conversation_to_on_evict_before_its_cells_go() -> None:
    from engine.scheduler import Gen, Scheduler
    from tests.test_engine_scheduler import FakeKv

    kv = FakeKv(2)
    seen: list[tuple[str | None, list[int], list[int]]] = []  # conversation, slot tokens, cells then
    sched = Scheduler(2, kv, on_evict=lambda s: seen.append((s.conversation, list(s.tokens), list(kv.cells[s.seq]))))
    gids = iter(range(1, 100))

    def run(conv: str, prompt: list[int]) -> None:
        g = Gen(next(gids), conv)
        g.tokens = prompt
        slot = sched.pick_slot(g)
        assert slot is not None
        sched.start(g, slot)
        for seg in sched.plan(512):
            kv.cells[seg.seq].extend(seg.tokens)
        sched.release(g)

    run("A", [1, 2, 3, 4])
    run("B", [5, 6, 7])
    assert seen == []  # two slots, two conversations: nobody lost one
    run("C", [8, 9])  # takes A's slot, the least recently used
    assert seen == [("A", [1, 2, 3, 4], [1, 2, 3, 4])]
    assert "A" not in sched.by_conv


def test_kv_cache_settings(tmp_path: Path) -> None:
    from bus.config import Settings, load_settings

    s = Settings(data_dir=str(tmp_path))
    assert 64 <= s.kv_cache_ram_mib <= 8192 and s.kv_cache_disk == 4096
    assert s.kv_cache_dir == tmp_path / "kv-cache"
    off = load_settings(environ={"LAMABUS_KV_CACHE_RAM": "0", "LAMABUS_KV_CACHE_DISK": "0"})
    assert (off.kv_cache_ram_mib, off.kv_cache_disk) == (0, 0)
    from wire.errors import LamaError

    with pytest.raises(LamaError):
        load_settings(environ={"LAMABUS_KV_CACHE_RAM": "-1"})
