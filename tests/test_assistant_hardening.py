"""The assistant's answers to issue 16 with in-memory ports: a cancel is never lost, and
timing.queueTime covers the whole wait (the bus paths are tested in test_hostile_e2e.py)."""

from __future__ import annotations

import time
from typing import AsyncIterator

import anyio

from engine.types import GenerationResult, TokenChunk
from handlers.assistant import Assistant, AssistantSettings
from tests.test_assistant_unit import FakeDelivery, FakeDirectory, FakePublisher, msg
from wire.messages import GenerationCancelled, GenerationCompleted, GenerationStarted, Timing, Usage


class LoadingRuntime:
    """Like the real engine: a request is unknown to ``cancel`` until the model has loaded and
    the engine has taken it; until then ``cancel`` finds nothing and returns False."""

    def __init__(self, *, load_seconds: float = 0.0) -> None:
        self.loading = anyio.Event()
        self.loaded = anyio.Event()
        self.load_seconds = load_seconds
        self.known: set[str] = set()
        self.stop: set[str] = set()
        self.admitted_at_ms: float | None = None

    async def generate_stream(self, model, request) -> AsyncIterator[TokenChunk | GenerationResult]:
        self.loading.set()
        await self.loaded.wait()
        if self.load_seconds:
            await anyio.sleep(self.load_seconds)
        self.known.add(request.request_id)
        self.admitted_at_ms = time.time() * 1000.0
        out = []
        for i in range(50):
            if request.request_id in self.stop:
                break
            out.append(f"w{i} ")
            yield TokenChunk(out[-1])
            await anyio.sleep(0)
        cancelled = request.request_id in self.stop
        yield GenerationResult(text="".join(out), thinking="", tokens=len(out),
                               finish_reason="cancelled" if cancelled else "stop",
                               timing=Timing(self.admitted_at_ms, self.admitted_at_ms + 1, 1, 1, 1),
                               usage=Usage(1, len(out), 1 + len(out)))

    async def cancel(self, request_id: str) -> bool:
        if request_id not in self.known:
            return False
        self.stop.add(request_id)
        return True


async def test_a_cancel_while_the_model_loads_is_honoured():
    directory, runtime, pub = FakeDirectory(), LoadingRuntime(), FakePublisher()
    async with Assistant(directory, runtime, pub) as assistant:
        d = FakeDelivery()
        await assistant.submit(msg("m1", "tell me"), d)
        await runtime.loading.wait()  # generation.started is out; the engine does not know m1 yet
        assert any(isinstance(e, GenerationStarted) for e in pub.events)
        reply = await assistant.cancel("t1", "m1")
        assert reply.cancelled and reply.request_id == "m1"
        runtime.loaded.set()
        with anyio.fail_after(10):
            await d.acked.wait()
    assert pub.messages == [], "no reply is posted for a cancelled request"
    assert not any(isinstance(e, GenerationCompleted) for e in pub.events)
    cancelled = [e for e in pub.events if isinstance(e, GenerationCancelled)]
    assert [c.request_id for c in cancelled] == ["m1"]
    assert pub.tokens == [], "no token goes out after the cancel"
    assert directory.unanswered == [("m1", "cancelled")]


async def test_a_cancel_while_waiting_for_a_topic_slot_is_honoured():
    directory, runtime, pub = FakeDirectory(), LoadingRuntime(), FakePublisher()
    settings = AssistantSettings(max_concurrent_topics=1)
    async with Assistant(directory, runtime, pub, settings) as assistant:
        first, second = FakeDelivery(), FakeDelivery()
        await assistant.submit(msg("a1", "first", topic="ta"), first)
        await runtime.loading.wait()  # ta holds the only slot
        await assistant.submit(msg("b1", "second", topic="tb"), second)
        reply = await assistant.cancel("tb", "b1")
        assert reply.cancelled
        runtime.loaded.set()
        with anyio.fail_after(10):
            await first.acked.wait()
            await second.acked.wait()
    assert [m.reply_to for m in pub.messages] == ["a1"]
    assert [e.request_id for e in pub.events if isinstance(e, GenerationCancelled)] == ["b1"]


async def test_queue_time_covers_the_model_load():
    directory, runtime, pub = FakeDirectory(), LoadingRuntime(load_seconds=0.3), FakePublisher()
    async with Assistant(directory, runtime, pub) as assistant:
        d = FakeDelivery()
        before = time.time() * 1000.0
        await assistant.submit(msg("m1", "hi"), d)
        runtime.loaded.set()
        with anyio.fail_after(10):
            await d.acked.wait()
    completed = next(e for e in pub.events if isinstance(e, GenerationCompleted))
    assert runtime.admitted_at_ms is not None
    # Acceptance to the engine's start: at least the 0.3 s load, and no more than it really was.
    assert completed.timing.queue_time >= 300.0
    assert completed.timing.queue_time <= runtime.admitted_at_ms - before + 1.0
