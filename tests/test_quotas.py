"""Unit tests of handlers/quotas.py: a fake clock, no bus (the bus paths: tests/test_e2e_quotas.py)."""

from __future__ import annotations

import collections
import math

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.quotas import MAX_REFUSALS_REMEMBERED, QuotaRefused, Quotas, QuotaSettings
from wire.errors import ErrorCode


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**kw) -> tuple[Quotas, Clock]:
    clock = Clock()
    return Quotas(QuotaSettings(**kw), clock=clock), clock


def admit(q: Quotas, author: str = "alice", rid: str = "r", *, chars: int = 5, asked: int | None = None,
          path: str = "topic", redelivered: bool = False):
    return q.admit(author, rid, prompt_chars=chars, asked_max_tokens=asked, path=path,  # type: ignore[arg-type]
                   redelivered=redelivered)


def refused(fn) -> QuotaRefused:
    with pytest.raises(QuotaRefused) as exc:
        fn()
    return exc.value


def test_rate_limit_refuses_the_one_past_the_limit_and_says_exactly_when_to_come_back():
    q, clock = make(messages_per_minute=3, running_per_author=0)
    for i in range(3):
        admit(q, rid=f"m{i}").release()
        clock.now += 10.0  # accepted at 1000, 1010, 1020
    clock.now = 1025.0
    err = refused(lambda: admit(q, rid="m3"))
    assert err.code is ErrorCode.RATE_LIMITED and err.status == 429
    assert err.details["retryable"] is True
    assert err.details["retryAfterMs"] == 35_000  # the one of 1000 leaves the window at 1060
    assert err.details["limit"] == 3 and err.details["windowMs"] == 60_000
    # Another author is not affected.
    admit(q, author="bob", rid="b0").release()
    # Just before the promised time: still refused; at it: accepted.
    clock.now = 1060.0 - 0.001
    assert refused(lambda: admit(q, rid="m3")).details["retryAfterMs"] == 1
    clock.now = 1060.0
    admit(q, rid="m3").release()
    assert q.refusals[("topic", "rate")] == 2


def test_refused_messages_do_not_use_up_the_window():
    q, clock = make(messages_per_minute=2, running_per_author=0)
    admit(q, rid="a").release()
    admit(q, rid="b").release()
    for i in range(5):
        refused(lambda: admit(q, rid=f"x{i}"))
    clock.now += 60.0
    admit(q, rid="c").release()
    admit(q, rid="d").release()


def test_running_per_author_counts_unreleased_tickets_and_release_is_idempotent():
    q, _ = make(messages_per_minute=0, running_per_author=2)
    t1, t2 = admit(q, rid="a"), admit(q, rid="b")
    err = refused(lambda: admit(q, rid="c"))
    assert err.code is ErrorCode.TOO_MANY_RUNNING and err.status == 429
    assert err.details == {"retryable": True, "running": 2, "limit": 2}
    admit(q, author="bob", rid="z")  # per author
    t1.release()
    t1.release()  # a second release gives nothing back
    t3 = admit(q, rid="c")
    assert q.running("alice") == 2
    refused(lambda: admit(q, rid="d"))
    t2.release(), t3.release()
    assert q.running("alice") == 0


def test_running_refusal_does_not_use_up_the_rate_window():
    q, _ = make(messages_per_minute=2, running_per_author=1)
    t = admit(q, rid="a")
    assert refused(lambda: admit(q, rid="b")).code is ErrorCode.TOO_MANY_RUNNING
    t.release()
    admit(q, rid="b").release()  # the second of two, not the third


def test_prompt_cap_counts_characters_and_is_not_retryable():
    q, _ = make(prompt_chars=10)
    admit(q, rid="ok", chars=10).release()
    err = refused(lambda: admit(q, rid="big", chars=11, path="llm"))
    assert err.code is ErrorCode.PROMPT_TOO_LARGE and err.status == 400
    assert err.details == {"chars": 11, "limit": 10}
    assert q.refusals[("llm", "prompt")] == 1


def test_max_tokens_refuse_policy_refuses_only_what_the_author_asked():
    q, _ = make(max_tokens=100, max_tokens_policy="refuse")
    err = refused(lambda: admit(q, rid="a", asked=101))
    assert err.code is ErrorCode.MAX_TOKENS_EXCEEDED and err.details["field"] == "$.params.maxTokens"
    admit(q, rid="b", asked=100).release()
    admit(q, rid="c", asked=None).release()
    # A model's stored maxTokens above the cap (no ask) is lowered even under "refuse".
    assert q.cap(500, "topic") == 100 and q.clamped["topic"] == 1


def test_max_tokens_clamp_policy_admits_and_lowers():
    q, _ = make(max_tokens=100, max_tokens_policy="clamp")
    admit(q, rid="a", asked=32768).release()
    assert q.cap(32768, "llm") == 100 and q.cap(100, "llm") == 100 and q.cap(7, "llm") == 7
    assert q.clamped == {"llm": 1}


def test_zero_switches_each_limit_off():
    q, _ = make(max_tokens=0, prompt_chars=0, messages_per_minute=0, running_per_author=0)
    tickets = [admit(q, rid=f"m{i}", chars=10**9, asked=32768) for i in range(500)]
    assert q.cap(32768, "topic") == 32768
    assert q.running("alice") == 500
    for t in tickets:
        t.release()


def test_a_redelivery_of_an_accepted_message_is_never_refused_and_counted_once():
    q, clock = make(messages_per_minute=3, running_per_author=2)
    t = admit(q, rid="a")
    clock.now += 1.0
    b = admit(q, rid="b")
    # "a" is handed back (its ticket released) and comes again while "b" and "c" are running.
    t.release()
    clock.now += 1.0
    admit(q, rid="c")
    clock.now += 1.0
    again = admit(q, rid="a", redelivered=True)  # over both limits, and still admitted
    assert q.running("alice") == 3
    again.release()
    # Counted once: the window holds a, b, c, and has room again one minute after "a" first came.
    assert [rid for _, rid in q._authors["alice"].window] == ["a", "b", "c"]
    assert refused(lambda: admit(q, rid="d")).details["retryAfterMs"] == 57_000
    b.release()
    clock.now = 1060.0
    admit(q, rid="d").release()


def test_a_redelivery_after_a_restart_is_admitted_whatever_it_asks():
    q, _ = make(prompt_chars=1, max_tokens=1, max_tokens_policy="refuse", messages_per_minute=1,
                running_per_author=1)
    admit(q, rid="x", chars=1)  # some other message holds both limits
    admit(q, rid="seen-by-a-dead-process", chars=50, asked=50, redelivered=True).release()


def test_a_redelivery_of_a_refused_message_is_refused_again_with_the_same_dedup_id():
    q, clock = make(messages_per_minute=1, running_per_author=0)
    admit(q, rid="a").release()
    first = refused(lambda: admit(q, rid="b"))
    clock.now += 120.0  # the window has room by now, but this delivery's answer was the refusal
    second = refused(lambda: admit(q, rid="b", redelivered=True))
    assert second.dedup_id == first.dedup_id and second.to_body() == first.to_body()
    assert q.refusals[("topic", "rate")] == 1  # refused once, said (at most) twice, deduplicated by the broker
    # A new send of "b" (a new broker dedup id: not a redelivery) is decided afresh ...
    t = admit(q, rid="b")
    # ... and a redelivery after that belongs to this acceptance.
    t.release()
    admit(q, rid="b", redelivered=True).release()


def test_two_refusals_of_the_same_id_sent_twice_have_different_dedup_ids():
    q, _ = make(prompt_chars=1)
    one = refused(lambda: admit(q, rid="same", chars=9))
    two = refused(lambda: admit(q, rid="same", chars=9))
    assert one.dedup_id != two.dedup_id  # a retry is answered again, not dropped by the broker


def test_refusals_remembered_are_bounded():
    q, _ = make(prompt_chars=1)
    for i in range(MAX_REFUSALS_REMEMBERED + 50):
        refused(lambda: admit(q, rid=f"r{i}", chars=2))
    assert len(q._refused) == MAX_REFUSALS_REMEMBERED
    # The oldest is forgotten: its redelivery is admitted (as after a restart).
    admit(q, rid="r0", chars=2, redelivered=True).release()


def test_idle_authors_are_forgotten_and_running_ones_kept():
    q, clock = make(messages_per_minute=50, running_per_author=5)
    held = admit(q, author="runner", rid="long")
    for i in range(100):
        admit(q, author=f"a{i}", rid=f"m{i}").release()
    assert q.stats()["authors"] == 101
    clock.now += 61.0
    for i in range(10):  # each admission forgets a bounded number of idle authors
        admit(q, author="late", rid=f"l{i}").release()
    assert set(q._authors) == {"runner", "late"}
    held.release()
    clock.now += 61.0
    admit(q, author="x", rid="x").release()
    assert set(q._authors) == {"x"}


def test_max_authors_bounds_memory_without_losing_a_running_count():
    q, _ = make(messages_per_minute=10, running_per_author=1, max_authors=3)
    running = [admit(q, author=f"r{i}", rid=f"r{i}") for i in range(2)]
    for i in range(50):
        admit(q, author=f"a{i}", rid=f"a{i}").release()
        assert len(q._authors) <= 3
    assert q.evicted == 49  # each forgotten while its window still held its message
    for i, t in enumerate(running):
        assert q.running(f"r{i}") == 1
        refused(lambda: admit(q, author=f"r{i}", rid="more"))  # its running count survived
        t.release()
    assert all(q.running(f"r{i}") == 0 for i in range(2))


async def test_exact_under_concurrency():
    # Many tasks ask at once, each yielding to the others around its admission: exactly the limit gets in.
    q, _ = make(messages_per_minute=7, running_per_author=0)
    accepted: list[str] = []
    refusals: list[QuotaRefused] = []

    async def one(i: int) -> None:
        await anyio.sleep(0)
        try:
            admit(q, rid=f"m{i}").release()
            accepted.append(f"m{i}")
        except QuotaRefused as exc:
            refusals.append(exc)
        await anyio.sleep(0)

    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(one, i)
    assert len(accepted) == 7 and len(refusals) == 93
    assert q.refusals[("topic", "rate")] == 93


# ---------------------------------------------------------------------------------------- model-based

ops = st.lists(st.one_of(
    st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=30.0)),
    st.tuples(st.just("admit"), st.integers(min_value=0, max_value=3)),
    st.tuples(st.just("release"), st.integers(min_value=0, max_value=50)),
    st.tuples(st.just("redeliver"), st.integers(min_value=0, max_value=50)),
), max_size=120)


@settings(max_examples=150, deadline=None)
@given(ops=ops, limit=st.integers(min_value=1, max_value=5), running_limit=st.integers(min_value=1, max_value=4),
       max_authors=st.integers(min_value=1, max_value=6))
def test_matches_a_reference_that_keeps_everything(ops, limit, running_limit, max_authors):
    """The quota's decisions equal those of a naive reference keeping every acceptance time, as long as
    no author was forgotten early (max_authors); memory stays within its bounds throughout."""
    q, clock = make(messages_per_minute=limit, running_per_author=running_limit, max_authors=max_authors)
    accepted_at: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    running: collections.Counter[str] = collections.Counter()
    tickets: list[tuple[str, str, object]] = []  # (author, request id, ticket) not yet released
    settled: list[tuple[str, str]] = []  # accepted and released: may be redelivered
    serial = 0
    for op, arg in ops:
        if op == "advance":
            clock.now += arg
            continue
        if op == "release":
            if tickets:
                author, rid, ticket = tickets.pop(arg % len(tickets))
                ticket.release()  # type: ignore[attr-defined]
                running[author] -= 1
                settled.append((author, rid))
            continue
        if op == "redeliver":
            if settled:
                author, rid = settled.pop(arg % len(settled))
                ticket = admit(q, author=author, rid=rid, redelivered=True)
                if all(r != rid for t, r in accepted_at[author] if t > clock.now - 60.0):
                    accepted_at[author].append((clock.now, rid))
                running[author] += 1
                tickets.append((author, rid, ticket))
            continue
        author = f"a{arg}"
        serial += 1
        rid = f"m{serial}"
        recent = [t for t, _ in accepted_at[author] if t > clock.now - 60.0]
        if q.evicted:
            return  # a forgotten author has a fresh window: the reference no longer applies
        expected: ErrorCode | None = None
        if len(recent) >= limit:
            expected = ErrorCode.RATE_LIMITED
        elif running[author] >= running_limit:
            expected = ErrorCode.TOO_MANY_RUNNING
        try:
            ticket = admit(q, author=author, rid=rid)
        except QuotaRefused as exc:
            assert exc.code is expected
            if expected is ErrorCode.RATE_LIMITED:
                leaving = sorted(recent)[len(recent) - limit]
                assert exc.details["retryAfterMs"] == max(1, math.ceil((leaving + 60.0 - clock.now) * 1000.0))
            continue
        assert expected is None
        accepted_at[author].append((clock.now, rid))
        running[author] += 1
        tickets.append((author, rid, ticket))
        # Bounded: authors kept are at most max_authors, or those running something (plus the one just admitted).
        busy = sum(1 for a in q._authors.values() if a.running)
        assert len(q._authors) <= max(max_authors, busy + 1)
        assert all(len(a.window) <= limit + 60 for a in q._authors.values())


def test_retry_after_counts_redeliveries_admitted_over_the_limit():
    q, clock = make(messages_per_minute=2, running_per_author=0)
    admit(q, rid="a").release()  # 1000
    clock.now = 1010.0
    admit(q, rid="b").release()
    clock.now = 1020.0
    admit(q, rid="z", redelivered=True).release()  # accepted by a process that died: 3 in the window
    clock.now = 1030.0
    # Room for one more once two have left: "b" leaves at 1070.
    assert refused(lambda: admit(q, rid="c")).details["retryAfterMs"] == 40_000


def test_settings_have_quota_defaults_and_take_them_from_the_environment_and_the_file(tmp_path):
    from bus.config import Settings, load_settings
    from wire.errors import LamaError

    d = Settings()
    assert (d.quota_max_tokens, d.quota_max_tokens_policy, d.quota_prompt_chars, d.quota_messages_per_minute,
            d.quota_running_per_author) == (4096, "clamp", 131_072, 300, 16)
    config = tmp_path / "lamabus.toml"
    config.write_text('[lamabus]\nquota_max_tokens_policy = "refuse"\nquota_prompt_chars = 0\n')
    s = load_settings(environ={"LAMABUS_QUOTA_MESSAGES_PER_MINUTE": "0", "LAMABUS_QUOTA_RUNNING_PER_AUTHOR": "2"},
                      config_file=config)
    assert (s.quota_max_tokens_policy, s.quota_prompt_chars, s.quota_messages_per_minute,
            s.quota_running_per_author) == ("refuse", 0, 0, 2)
    with pytest.raises(LamaError) as exc:
        load_settings(environ={"LAMABUS_QUOTA_MAX_TOKENS_POLICY": "sometimes"})
    assert exc.value.code is ErrorCode.BAD_REQUEST and exc.value.details["field"] == "$.quota_max_tokens_policy"
    with pytest.raises(LamaError):
        load_settings(environ={"LAMABUS_QUOTA_MAX_TOKENS": "40000"})  # above the wire's maxTokens bound
