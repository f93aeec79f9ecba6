"""The assistant with quotas (handlers/quotas.py), on in-memory ports: refusals on the topic, the
running count released however a message ends, and redelivery never turning an acceptance into a
refusal (the bus and the real model: tests/test_e2e_quotas.py)."""

from __future__ import annotations

import anyio

from handlers.assistant import Assistant
from handlers.ports import HandBack
from handlers.quotas import Quotas, QuotaSettings
from tests.test_assistant_unit import FakeDelivery, msg, parts  # noqa: F401  (parts: the fixture)
from wire.errors import ErrorCode
from wire.messages import GenerationCompleted, GenerationFailed
from wire.params import GenerationParams


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class HandedBack(FakeDelivery):
    def __init__(self, redelivered: bool = False) -> None:
        super().__init__(redelivered)
        self.back = anyio.Event()

    async def retry_later(self) -> None:
        self.back.set()


def quotas(**kw) -> Quotas:
    kw.setdefault("running_per_author", 0)
    kw.setdefault("messages_per_minute", 0)
    return Quotas(QuotaSettings(**kw), clock=Clock())


def failures(pub) -> list[GenerationFailed]:
    return [e for e in pub.events if isinstance(e, GenerationFailed)]


async def test_a_rate_limited_message_is_refused_on_the_topic_and_never_generated(parts):
    directory, runtime, pub = parts
    q = quotas(messages_per_minute=1)
    async with Assistant(directory, runtime, pub, quotas=q) as assistant:
        first, second = FakeDelivery(), FakeDelivery()
        await assistant.submit(msg("a", "one"), first)
        await assistant.submit(msg("b", "two", topic="t2"), second)
        assert second.acked.is_set()
        await first.acked.wait()
    (failed,) = failures(pub)
    assert failed.request_id == "b" and failed.topic == "t2" and failed.error.code is ErrorCode.RATE_LIMITED
    assert failed.error.details is not None and failed.error.details["retryAfterMs"] == 60_000
    assert failed.error.details["retryable"] is True
    assert [r.request_id for r in runtime.requests] == ["a"]
    assert assistant.stats()["quotas"]["refusals"] == {"topic.rate": 1}  # type: ignore[index]


async def test_the_running_place_is_released_when_the_message_is_answered(parts):
    directory, runtime, pub = parts
    runtime.gates["a"] = anyio.Event()
    q = quotas(running_per_author=1)
    async with Assistant(directory, runtime, pub, quotas=q) as assistant:
        da, db, dc = FakeDelivery(), FakeDelivery(), FakeDelivery()
        await assistant.submit(msg("a", "slow one"), da)
        await runtime.reached["a"].wait()
        await assistant.submit(msg("b", "another topic", topic="t2"), db)
        assert db.acked.is_set()
        (failed,) = failures(pub)
        assert failed.request_id == "b" and failed.error.code is ErrorCode.TOO_MANY_RUNNING
        assert q.running("alice") == 1
        runtime.gates["a"].set()
        await da.acked.wait()
        # Released in the lane's finally, which runs on from the ack without yielding.
        assert q.running("alice") == 0
        await assistant.submit(msg("c", "now there is room", topic="t2"), dc)
        await dc.acked.wait()
    assert [e.request_id for e in pub.events if isinstance(e, GenerationCompleted)] == ["a", "c"]


async def test_failed_before_queueing_releases_the_running_place(parts):
    directory, runtime, pub = parts
    q = quotas(running_per_author=1)
    async with Assistant(directory, runtime, pub, quotas=q) as assistant:
        d = FakeDelivery()
        await assistant.submit(msg("a", "hi", model_id="nope"), d)
        assert d.acked.is_set() and failures(pub)[0].error.code is ErrorCode.MODEL_NOT_FOUND
        assert q.running("alice") == 0


async def test_a_message_accepted_then_handed_back_is_not_refused_when_it_comes_again(parts):
    directory, runtime, pub = parts
    q = quotas(messages_per_minute=1, running_per_author=1)
    looks = {"a": 0}
    recorded_reply = directory.recorded_reply

    async def held_once(topic, message_id):
        # The lane's look before answering (the second for "a") finds an earlier message of the topic
        # unanswered, as bus/node/lane_order.py does, and the message is handed back to the broker.
        if message_id in looks:
            looks[message_id] += 1
            if looks[message_id] == 2:
                raise HandBack("an earlier message of the topic is still to be answered")
        return await recorded_reply(topic, message_id)

    directory.recorded_reply = held_once
    async with Assistant(directory, runtime, pub, quotas=q) as assistant:
        first = HandedBack()
        await assistant.submit(msg("a", "hello there"), first)
        with anyio.fail_after(10):
            await first.back.wait()
        assert q.running("alice") == 0
        # In between, a fresh message of the author is refused: the minute's one message was "a".
        other = FakeDelivery()
        await assistant.submit(msg("b", "me too", topic="t2"), other)
        assert [f.request_id for f in failures(pub)] == ["b"]
        again = FakeDelivery(redelivered=True)
        await assistant.submit(msg("a", "hello there"), again)
        with anyio.fail_after(10):
            await again.acked.wait()
    assert [f.request_id for f in failures(pub)] == ["b"]  # "a" was never refused
    assert [e.request_id for e in pub.events if isinstance(e, GenerationCompleted)] == ["a"]


async def test_a_refused_message_delivered_again_is_refused_again_under_the_same_dedup_id(parts):
    directory, runtime, pub = parts
    q = quotas(prompt_chars=4)
    async with Assistant(directory, runtime, pub, quotas=q) as assistant:
        await assistant.submit(msg("a", "too long"), FakeDelivery())
        # The ack of the refusal was lost: the broker delivers it again.
        await assistant.submit(msg("a", "too long"), FakeDelivery(redelivered=True))
    first, second = failures(pub)
    assert first == second and first.error.code is ErrorCode.PROMPT_TOO_LARGE
    ids = [d for e, d in zip(pub.events, pub.dedup_ids) if isinstance(e, GenerationFailed)]
    assert ids[0] == ids[1]  # the broker stores it once
    assert q.refusals[("topic", "prompt")] == 1 and runtime.requests == []


async def test_max_tokens_above_the_cap_is_clamped_or_refused(parts):
    directory, runtime, pub = parts
    asked = GenerationParams(max_tokens=9000)
    async with Assistant(directory, runtime, pub, quotas=quotas(max_tokens=64)) as assistant:
        d = FakeDelivery()
        await assistant.submit(msg("a", "long answer please", params=asked), d)
        await d.acked.wait()
    assert runtime.requests[0].sampling.max_tokens == 64
    async with Assistant(directory, runtime, pub,
                         quotas=quotas(max_tokens=64, max_tokens_policy="refuse")) as assistant:
        d = FakeDelivery()
        await assistant.submit(msg("b", "long answer please", params=asked), d)
        assert d.acked.is_set()
    (failed,) = failures(pub)
    assert failed.request_id == "b" and failed.error.code is ErrorCode.MAX_TOKENS_EXCEEDED
    assert len(runtime.requests) == 1


async def test_the_same_message_id_in_another_topic_is_another_message(parts):
    directory, runtime, pub = parts
    q = quotas(prompt_chars=4)
    async with Assistant(directory, runtime, pub, quotas=q) as assistant:
        await assistant.submit(msg("a", "too long", topic="t1"), FakeDelivery())
        # "a" of t2 was accepted, handed back and comes again: not t1's refusal.
        again = FakeDelivery(redelivered=True)
        await assistant.submit(msg("a", "ok", topic="t2"), again)
        with anyio.fail_after(10):
            await again.acked.wait()
    assert [f.topic for f in failures(pub)] == ["t1"]
    assert [e.topic for e in pub.events if isinstance(e, GenerationCompleted)] == ["t2"]
