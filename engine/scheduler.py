"""Which generation runs on which sequence slot, and what goes into each decode step. Pure Python.

A worker's llama context holds ``n_seq_max`` sequences ("slots"), each with its own KV
cells. A slot remembers the tokens its cells hold and the conversation they belong to,
so that a follow-up turn evaluates only what differs from that common prefix.

The rule behind batching speed: llama.cpp's non-unified KV cache puts sequences into one
micro-batch only while their ids rise by one in batch order
(``llama_batch_allocr::split_equal``, sequential). Decoding ids {0, 2, 4, 6}, or 0..7 in
admission order, costs a pass over the weights per run of consecutive ids (measured in
bench/batch_order.py: ascending 0..7 245 tok/s, shuffled 141, with gaps 109). Hence:

* :meth:`Scheduler.plan` lays tokens out in ascending sequence id,
* :meth:`Scheduler.pick_slot` puts a newcomer next to the running block,
* :meth:`Scheduler.compact` closes a gap left by a finished sequence by moving a running
  sequence's KV cells onto the free id.

The KV operations go through the small :class:`KvCache` port, so all of this is tested
without a model (tests/test_engine_scheduler.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol


class KvCache(Protocol):
    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        """Forget positions ``[p0, p1)`` of ``seq`` (-1: open end); False if it cannot cut there."""

    def seq_cp(self, src: int, dst: int) -> None:
        """Copy every cell of ``src`` to ``dst``."""


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Slot:
    __slots__ = ("seq", "tokens", "conversation", "gen", "last_used")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.tokens: list[int] = []  # what the KV cache holds for this sequence, positions 0..n-1
        self.conversation: str | None = None
        self.gen: Gen | None = None
        self.last_used = 0.0


class Gen:
    """The scheduling state of one generation; the worker subclasses it with what llama needs."""

    __slots__ = ("gid", "conversation", "tokens", "pending", "next_token", "slot", "cached", "logit_idx")

    def __init__(self, gid: int, conversation: str | None) -> None:
        self.gid = gid
        self.conversation = conversation
        self.tokens: list[int] | None = None  # the full prompt, once tokenized
        self.pending: list[int] = []  # prompt tokens not yet decoded
        self.next_token: int | None = None  # sampled, to be decoded in the next step
        self.slot: Slot | None = None
        self.cached = 0
        self.logit_idx = -1


class Segment(NamedTuple):
    """Consecutive tokens of one sequence in a batch; ``logits``: the last one's logits are wanted."""

    gen: Gen
    seq: int
    pos: int
    tokens: list[int]
    logits: bool


class Scheduler:
    def __init__(
        self,
        n_seq: int,
        kv: KvCache,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[Slot], None] | None = None,
    ) -> None:
        """``on_evict(slot)``: called just before an idle slot's conversation loses its cells (its slot
        goes to another conversation, or a running sequence is moved onto it), to save them."""
        self.kv = kv
        self.clock = clock
        self.on_evict = on_evict
        self.slots = [Slot(i) for i in range(n_seq)]
        self.by_conv: dict[str, Slot] = {}
        self.active: list[Gen] = []
        self.kv_moves = 0

    def pick_slot(self, g: Gen) -> Slot | None:
        """The slot for ``g`` now, or None: it waits (all busy, or its conversation is mid-turn)."""
        conv = g.conversation
        if conv is not None:
            s = self.by_conv.get(conv)
            if s is not None:
                return s if s.gen is None else None  # one turn at a time per conversation
        idle = [s for s in self.slots if s.gen is None]
        if not idle:
            return None
        busy = sorted(s.seq for s in self.slots if s.gen is not None)
        if busy:
            beside = [s for s in idle if s.seq in (busy[0] - 1, busy[-1] + 1)]
            idle = beside or idle
        unbound = [s for s in idle if s.conversation is None]
        if unbound:
            assert g.tokens is not None
            return max(unbound, key=lambda s: (common_prefix(s.tokens, g.tokens), -s.last_used))  # type: ignore[arg-type]
        return min(idle, key=lambda s: s.last_used)  # evict the least recently used conversation

    def start(self, g: Gen, slot: Slot) -> None:
        """Run ``g`` on ``slot``, reusing the longest cached prefix of its prompt."""
        conv = g.conversation
        if slot.conversation is not None and slot.conversation != conv:
            self.evict(slot)
        if conv is not None:
            slot.conversation = conv
            self.by_conv[conv] = slot
        assert g.tokens is not None
        p = common_prefix(slot.tokens, g.tokens)
        if p >= len(g.tokens):
            p = len(g.tokens) - 1  # the last prompt token is evaluated again: its logits give the first token
        if p < len(slot.tokens):
            if not self.kv.seq_rm(slot.seq, p, -1):
                # some memory types cannot cut a sequence in the middle; start it over
                self.kv.seq_rm(slot.seq, -1, -1)
                p = 0
            del slot.tokens[p:]
        g.cached = p
        g.pending = g.tokens[p:]
        g.slot = slot
        slot.gen = g
        self.active.append(g)

    def evict(self, slot: Slot) -> None:
        """Unbind ``slot``'s conversation, after ``on_evict`` saved its cells; they stay until cut."""
        if slot.conversation is None:
            return
        if self.on_evict is not None and slot.tokens:
            self.on_evict(slot)
        self.by_conv.pop(slot.conversation, None)
        slot.conversation = None

    def release(self, g: Gen) -> None:
        slot = g.slot
        if slot is not None:
            slot.gen = None
            slot.last_used = self.clock()
            if g in self.active:
                self.active.remove(g)

    def drop(self, slot: Slot | None) -> None:
        """Forget what ``slot`` holds (after a failed decode its cells are suspect)."""
        if slot is None:
            return
        self.kv.seq_rm(slot.seq, -1, -1)
        slot.tokens.clear()
        if slot.conversation is not None:
            self.by_conv.pop(slot.conversation, None)
            slot.conversation = None

    def compact(self) -> None:
        """Keep the running sequences on consecutive ids, moving a sequence's KV where there is a gap.

        A move copies one stream (a few ms) and costs the idle slot it lands on its cached
        conversation, so the window chosen keeps the most running sequences in place, then
        spoils the fewest cached conversations.
        """
        busy = sorted((s for s in self.slots if s.gen is not None), key=lambda s: s.seq)
        k = len(busy)
        if k < 2 or busy[-1].seq - busy[0].seq == k - 1:
            return
        by_seq = {s.seq: s for s in self.slots}

        def fit(lo: int) -> tuple[int, int]:
            inside = sum(1 for s in busy if lo <= s.seq < lo + k)
            cached = sum(1 for q in range(lo, lo + k) if by_seq[q].gen is None and by_seq[q].conversation is not None)
            return inside, -cached

        lo = max(range(len(self.slots) - k + 1), key=fit)
        holes = [by_seq[q] for q in range(lo, lo + k) if by_seq[q].gen is None]
        movers = [s for s in busy if not lo <= s.seq < lo + k]
        for src, dst in zip(movers, holes):
            self._move(src, dst)

    def _move(self, src: Slot, dst: Slot) -> None:
        """Give running ``src`` the sequence id of idle ``dst``, KV and all; ``dst`` gets ``src``'s, empty."""
        kv = self.kv
        self.evict(dst)
        kv.seq_rm(dst.seq, -1, -1)
        kv.seq_cp(src.seq, dst.seq)
        kv.seq_rm(src.seq, -1, -1)
        dst.tokens = []
        src.seq, dst.seq = dst.seq, src.seq
        self.kv_moves += 1

    def plan(self, n_batch: int) -> list[Segment]:
        """The next decode step: ascending sequence id, compacted first.

        Every running stream gets its next token (so none starves); prompts share what is
        left of ``n_batch``, first come first. The slots' token lists are advanced as if
        the step succeeded; a failed decode drops the sequences (:meth:`drop`).
        """
        self.compact()
        active = self.active
        budget = n_batch - sum(1 for g in active if g.next_token is not None)
        takes: dict[int, int] = {}
        for g in active:
            if budget <= 0:
                break
            if g.next_token is None and g.pending:
                takes[g.gid] = take = min(len(g.pending), budget)
                budget -= take
        out: list[Segment] = []
        for g in sorted(active, key=_seq_of):
            slot = g.slot
            assert slot is not None
            t = g.next_token
            if t is not None:
                out.append(Segment(g, slot.seq, len(slot.tokens), [t], True))
                slot.tokens.append(t)
                g.next_token = None
                continue
            take = takes.get(g.gid, 0)
            if not take:
                continue
            chunk = g.pending[:take]
            del g.pending[:take]
            out.append(Segment(g, slot.seq, len(slot.tokens), chunk, not g.pending))
            slot.tokens.extend(chunk)
        return out

    def slot_stats(self) -> list[dict[str, Any]]:
        return [
            {"seq": s.seq, "tokens": len(s.tokens), "conversation": s.conversation, "busy": s.gen is not None}
            for s in sorted(self.slots, key=lambda s: s.seq)
        ]


def _seq_of(g: Gen) -> int:
    assert g.slot is not None
    return g.slot.seq
