"""The slot scheduler without a model: a fake KV cache records what each sequence id holds.

The rule under test (engine/scheduler.py, bench/batch_order.py): llama.cpp decodes the
running sequences in one pass over the weights only while their ids are consecutive and
ascending in the batch.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.scheduler import Gen, Scheduler, Segment, common_prefix


class FakeKv:
    """What llama.cpp's memory would hold, per sequence id: a list of token positions."""

    def __init__(self, n_seq: int) -> None:
        self.cells: dict[int, list[int]] = {s: [] for s in range(n_seq)}
        self.copies: list[tuple[int, int]] = []
        self.refuse_cuts = False

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        if p0 < 0:
            self.cells[seq] = []
            return True
        if self.refuse_cuts:
            return False
        assert p1 == -1
        del self.cells[seq][p0:]
        return True

    def seq_cp(self, src: int, dst: int) -> None:
        self.copies.append((src, dst))
        self.cells[dst] = list(self.cells[src])


class Harness:
    def __init__(self, n_seq: int = 8, n_batch: int = 512) -> None:
        self.kv = FakeKv(n_seq)
        self.now = itertools.count(1)
        self.sched = Scheduler(n_seq, self.kv, clock=lambda: float(next(self.now)))
        self.n_batch = n_batch
        self.gids = itertools.count(1)

    def submit(self, prompt: list[int], conversation: str | None = None) -> Gen:
        g = Gen(next(self.gids), conversation)
        g.tokens = list(prompt)
        slot = self.sched.pick_slot(g)
        assert slot is not None
        self.sched.start(g, slot)
        return g

    def step(self) -> list[Segment]:
        """Plan a step and "decode" it into the fake cache; sampled token: 1000 + gid."""
        segments = self.sched.plan(self.n_batch)
        for seg in segments:
            cells = self.kv.cells[seg.seq]
            assert len(cells) == seg.pos, "a segment must continue its sequence's cells"
            cells.extend(seg.tokens)
            if seg.logits:
                seg.gen.next_token = 1000 + seg.gen.gid
        return segments

    def finish(self, g: Gen) -> None:
        self.sched.release(g)

    def running_seqs(self) -> list[int]:
        return sorted(g.slot.seq for g in self.sched.active)  # type: ignore[union-attr]


def assert_one_pass(segments: list[Segment]) -> None:
    seqs = [s.seq for s in segments]
    assert seqs == sorted(seqs), f"batch not in ascending sequence id: {seqs}"
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"sequence ids not consecutive: {seqs}"


def test_batch_tokens_are_in_ascending_sequence_id_whatever_the_admission_order():
    h = Harness()
    gens = [h.submit([1, 2, 3, i]) for i in range(5)]
    h.step()  # prompts
    # Admission order no longer matters: shuffle the running list the way arrivals would.
    h.sched.active[:] = [gens[3], gens[0], gens[4], gens[1], gens[2]]
    segments = h.step()
    assert_one_pass(segments)
    assert all(len(s.tokens) == 1 and s.logits for s in segments)


def test_a_new_conversation_takes_the_slot_next_to_the_running_block():
    h = Harness()
    a, b, c = (h.submit([7, i], conversation=f"c{i}") for i in range(3))
    h.step()
    assert h.running_seqs() == [0, 1, 2]
    h.finish(a)  # seq 0 is idle again, and holds c0's cache
    d = h.submit([9, 9], conversation="new")
    # Beside the block: 0 (before it) or 3 (after it); either keeps the ids consecutive.
    assert d.slot.seq in (0, 3)  # type: ignore[union-attr]
    assert_one_pass(h.step())
    assert b.slot is not None and c.slot is not None


def test_beside_the_running_block_wins_over_a_longer_cached_prefix_elsewhere():
    h = Harness()
    gens = [h.submit([i, 50, 51, 52]) for i in range(6)]
    h.step()
    for g in gens[:4]:
        h.finish(g)  # running: 4 and 5; seq 0 holds [0, 50, 51, 52, ...]
    newcomer = Gen(100, None)
    newcomer.tokens = [0, 50, 51, 52, 53]
    slot = h.sched.pick_slot(newcomer)
    assert slot is not None and slot.seq in (3, 6)


def test_a_returning_conversation_gets_its_own_slot_and_only_the_new_tokens_are_evaluated():
    h = Harness()
    g = h.submit([1, 2, 3, 4], conversation="topic")
    h.step()
    h.step()  # the sampled token 1001 went into the cache
    h.finish(g)
    follow = Gen(99, "topic")
    follow.tokens = [1, 2, 3, 4, 1001, 5, 6]
    slot = h.sched.pick_slot(follow)
    assert slot is g.slot
    h.sched.start(follow, slot)  # type: ignore[arg-type]
    assert follow.cached == 5 and follow.pending == [5, 6]


def test_the_same_prompt_again_reevaluates_its_last_token_for_the_logits():
    h = Harness()
    g = h.submit([1, 2, 3], conversation="t")
    h.step()
    h.finish(g)
    again = Gen(50, "t")
    again.tokens = [1, 2, 3]
    h.sched.start(again, h.sched.pick_slot(again))  # type: ignore[arg-type]
    assert again.cached == 2 and again.pending == [3]
    assert h.kv.cells[again.slot.seq] == [1, 2]  # type: ignore[union-attr]


def test_a_cache_that_cannot_be_cut_in_the_middle_is_cleared():
    h = Harness()
    g = h.submit([1, 2, 3, 4], conversation="t")
    h.step()
    h.finish(g)
    h.kv.refuse_cuts = True
    other = Gen(51, "t")
    other.tokens = [1, 2, 9]
    h.sched.start(other, h.sched.pick_slot(other))  # type: ignore[arg-type]
    assert other.cached == 0 and other.pending == [1, 2, 9]
    assert h.kv.cells[other.slot.seq] == []  # type: ignore[union-attr]


def test_one_turn_at_a_time_per_conversation():
    h = Harness()
    h.submit([1], conversation="t")
    second = Gen(77, "t")
    second.tokens = [1, 2]
    assert h.sched.pick_slot(second) is None


def test_all_slots_busy_means_wait():
    h = Harness(n_seq=2)
    h.submit([1])
    h.submit([2])
    g = Gen(9, None)
    g.tokens = [3]
    assert h.sched.pick_slot(g) is None


def test_compact_closes_a_gap_by_moving_a_sequence_and_its_cache():
    h = Harness()
    gens = [h.submit([10 * i, 10 * i + 1], conversation=f"c{i}") for i in range(3)]
    h.step()
    h.step()
    assert h.running_seqs() == [0, 1, 2]
    h.finish(gens[1])  # a gap at seq 1, which keeps c1's cache
    before = list(h.kv.cells[0])
    segments = h.step()
    assert_one_pass(segments)
    # The window 2..3 keeps seq 2 in place and spoils no cached conversation: seq 0 moves to 3.
    assert h.running_seqs() == [2, 3] and h.kv.copies == [(0, 3)] and h.sched.kv_moves == 1
    assert gens[0].slot.seq == 3 and h.kv.cells[3] == before + [1000 + gens[0].gid]  # type: ignore[union-attr]
    assert gens[0].slot.tokens == h.kv.cells[3]  # type: ignore[union-attr]
    assert h.kv.cells[0] == []
    freed = next(s for s in h.sched.slots if s.seq == 0)
    assert freed.gen is None and freed.tokens == [] and freed.conversation is None
    assert h.sched.by_conv["c1"].seq == 1 and h.kv.cells[1] == h.sched.by_conv["c1"].tokens != []


def test_compact_prefers_the_window_that_moves_fewest_and_spoils_fewest_caches():
    h = Harness(n_seq=6)
    gens = [h.submit([i], conversation=f"c{i}") for i in range(6)]
    h.step()
    for i in (0, 2, 3, 5):
        h.finish(gens[i])
    # Running: 1 and 4. Any 2-wide window holds at most one of them; all spoil one cached idle slot.
    h.step()
    assert h.sched.kv_moves == 1
    assert h.running_seqs() in ([0, 1], [1, 2], [3, 4], [4, 5])


def test_prompts_share_what_is_left_of_the_batch_and_running_streams_always_advance():
    h = Harness(n_batch=8)
    a = h.submit([1, 2, 3])
    h.step()
    b = h.submit(list(range(100, 120)))  # 20 prompt tokens, more than one batch
    segments = h.step()
    by_gen = {s.gen.gid: s for s in segments}
    assert by_gen[a.gid].tokens == [1000 + a.gid]
    assert len(by_gen[b.gid].tokens) == 7 and not by_gen[b.gid].logits
    assert_one_pass(segments)
    h.step()
    last = h.step()
    by_gen = {s.gen.gid: s for s in last}
    assert by_gen[b.gid].logits and len(by_gen[b.gid].tokens) == 20 - 14
    assert h.kv.cells[b.slot.seq][:20] == list(range(100, 120))  # type: ignore[union-attr]


def test_drop_forgets_the_cells_and_the_conversation():
    h = Harness()
    g = h.submit([1, 2], conversation="t")
    h.step()
    h.sched.drop(g.slot)
    h.finish(g)
    assert "t" not in h.sched.by_conv and h.kv.cells[g.slot.seq] == []  # type: ignore[union-attr]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(1, 6)), min_size=1, max_size=60))
def test_every_step_is_one_pass_and_every_cache_stays_with_its_generation(ops):
    """Random arrivals and endings: each planned step is ascending and consecutive, and each
    generation's cells (under whatever id it has now) are exactly the tokens it was given."""
    h = Harness(n_seq=8, n_batch=16)
    given_tokens: dict[int, list[int]] = {}
    for arrive, pick, length in ops:
        if arrive:
            g = Gen(next(h.gids), f"c{pick}")
            g.tokens = [pick * 100 + i for i in range(length)]
            slot = h.sched.pick_slot(g)
            if slot is not None:
                h.sched.start(g, slot)
                given_tokens[g.gid] = list(g.tokens[: g.cached])
        elif h.sched.active:
            g = h.sched.active[pick % len(h.sched.active)]
            h.finish(g)
        segments = h.step()
        if segments:
            assert_one_pass(segments)
        for seg in segments:
            given_tokens[seg.gen.gid].extend(seg.tokens)
        for g in h.sched.active:
            assert h.kv.cells[g.slot.seq] == given_tokens[g.gid] == g.slot.tokens  # type: ignore[union-attr]
