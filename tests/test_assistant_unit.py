"""Unit tests of handlers/assistant.py with in-memory ports (the bus and engine paths
are tested for real in test_e2e_*.py)."""

from __future__ import annotations

import collections
from datetime import datetime, timezone
from typing import AsyncIterator

import anyio
import pytest

from engine.types import ChatTurn, GenerateRequest, GenerationResult, ModelConfig, TokenChunk
from handlers.assistant import Assistant, AssistantSettings, completed_dedup_id, reply_id_for
from handlers.ports import ModelRef, RecordedReply
from wire.errors import ErrorCode, LamaError
from wire.params import GenerationParams
from wire.messages import (
    ChatMessage,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    GenerationToken,
    Timing,
    Usage,
)

AI = "ai-person"
MODEL = ModelRef(model_id="m1", person_id=AI, config=ModelConfig(model_path="/x.gguf"))


def msg(mid: str, text: str = "hi", topic: str = "t1", author: str = "alice", **kw) -> ChatMessage:
    return ChatMessage(id=mid, topic=topic, author_id=author, text=text, sent_at=datetime.now(timezone.utc), **kw)


class FakeDelivery:
    def __init__(self, redelivered: bool = False) -> None:
        self.redelivered = redelivered
        self.acked = anyio.Event()
        self.progress = 0
        self.progressed_twice = anyio.Event()

    async def ack(self) -> None:
        assert not self.acked.is_set(), "acked twice"
        self.acked.set()

    async def in_progress(self) -> None:
        self.progress += 1
        if self.progress >= 2:
            self.progressed_twice.set()

    async def retry_later(self) -> None:
        self.handed_back = True


class FakeDirectory:
    def __init__(self) -> None:
        self.replies: dict[tuple[str, str], RecordedReply] = {}
        self.turns: dict[str, list[ChatTurn]] = collections.defaultdict(list)
        self.unanswered: list[tuple[str, str]] = []

    async def resolve_model(self, topic, requested):
        if requested not in (None, "m1"):
            raise LamaError(ErrorCode.MODEL_NOT_FOUND, f"no model {requested}")
        return MODEL

    def is_ai(self, author_id):
        return author_id == AI

    async def recorded_reply(self, topic, message_id):
        return self.replies.get((topic, message_id))

    async def history(self, topic):
        return list(self.turns[topic])

    async def record_reply(self, message, reply, completed):
        self.replies[(message.topic, message.id)] = RecordedReply(reply, completed)
        self.turns[message.topic] += [ChatTurn("user", message.text), ChatTurn("assistant", reply.text)]

    async def record_unanswered(self, message, reason):
        self.unanswered.append((message.id, reason))


class FakeRuntime:
    """Echoes the last user turn word by word; can be held at a gate to test ordering."""

    def __init__(self) -> None:
        self.requests: list[GenerateRequest] = []
        self.gates: dict[str, anyio.Event] = {}
        self.cancelled: set[str] = set()
        self.running: list[str] = []
        self.fail_with: LamaError | None = None
        self.checked: list = []
        self.reached: collections.defaultdict[str, anyio.Event] = collections.defaultdict(anyio.Event)

    async def generate_stream(self, model, request) -> AsyncIterator[TokenChunk | GenerationResult]:
        self.requests.append(request)
        self.running.append(request.request_id)
        if self.fail_with:
            raise self.fail_with
        gate = self.gates.get(request.request_id)
        words = request.messages[-1].content.split()
        out = []
        for i, w in enumerate(words):
            if request.request_id in self.cancelled:
                break
            if gate is not None and i == 1:
                self.reached[request.request_id].set()
                await gate.wait()
                if request.request_id in self.cancelled:
                    break
            piece = w if i == 0 else " " + w
            out.append(piece)
            yield TokenChunk(piece)
        cancelled = request.request_id in self.cancelled
        text = "".join(out)
        yield GenerationResult(text=text, thinking="", tokens=len(out),
                               finish_reason="cancelled" if cancelled else "stop",
                               timing=Timing(0, 1, 1, 1, 1), usage=Usage(1, len(out), 1 + len(out)))

    async def check(self, model, sampling):
        self.checked.append(sampling)
        if sampling.grammar == "bad":
            raise LamaError(ErrorCode.BAD_REQUEST, "params.grammar does not parse", field="params.grammar")

    async def cancel(self, request_id):
        self.cancelled.add(request_id)
        gate = self.gates.get(request_id)
        if gate:
            gate.set()
        return True


class FakePublisher:
    def __init__(self) -> None:
        self.tokens: list[GenerationToken] = []
        self.events: list = []
        self.messages: list[ChatMessage] = []
        self.dedup_ids: list[str] = []

    async def token(self, token):
        self.tokens.append(token)

    async def event(self, event, *, dedup_id, wait=True):
        self.events.append(event)
        self.dedup_ids.append(dedup_id)

    async def message(self, message):
        self.messages.append(message)


@pytest.fixture
def parts():
    return FakeDirectory(), FakeRuntime(), FakePublisher()


async def test_reply_streams_tokens_then_records_then_acks(parts):
    directory, runtime, pub = parts
    async with Assistant(directory, runtime, pub) as assistant:
        d = FakeDelivery()
        await assistant.submit(msg("a", "one two three"), d)
        await d.acked.wait()
    assert [t.seq for t in pub.tokens] == [0, 1, 2]
    assert "".join(t.text for t in pub.tokens) == "one two three"
    assert all(t.author_id == AI and t.request_id == "a" for t in pub.tokens)
    started, completed = pub.events
    assert isinstance(started, GenerationStarted) and started.queue_position == 0
    assert isinstance(completed, GenerationCompleted) and completed.text == "one two three"
    (reply,) = pub.messages
    assert reply.author_id == AI and reply.reply_to == "a" and reply.id == reply_id_for("t1", "a")
    assert completed.message_id == reply.id
    assert runtime.requests[0].messages[0].role == "system"
    assert runtime.requests[0].conversation == "t1"


async def test_ai_authored_messages_are_never_answered(parts):
    directory, runtime, pub = parts
    async with Assistant(directory, runtime, pub) as assistant:
        d = FakeDelivery()
        await assistant.submit(msg("a", author=AI), d)
        assert d.acked.is_set()
    assert runtime.requests == [] and pub.events == []


async def test_answered_message_is_not_answered_twice(parts):
    directory, runtime, pub = parts
    async with Assistant(directory, runtime, pub) as assistant:
        first = FakeDelivery()
        await assistant.submit(msg("a", "x y"), first)
        await first.acked.wait()
        again = FakeDelivery(redelivered=False)
        await assistant.submit(msg("a", "x y"), again)
        assert again.acked.is_set()
    assert len(runtime.requests) == 1
    assert len(pub.messages) == 1


async def test_redelivery_republishes_the_recorded_reply_with_the_same_id(parts):
    directory, runtime, pub = parts
    async with Assistant(directory, runtime, pub) as assistant:
        first = FakeDelivery()
        await assistant.submit(msg("a", "x y"), first)
        await first.acked.wait()
        again = FakeDelivery(redelivered=True)
        await assistant.submit(msg("a", "x y"), again)
    assert len(runtime.requests) == 1
    assert [m.id for m in pub.messages] == [reply_id_for("t1", "a")] * 2
    assert pub.dedup_ids.count(completed_dedup_id(reply_id_for("t1", "a"))) == 2


async def test_one_topic_in_order_and_history_carries_earlier_turns(parts):
    directory, runtime, pub = parts
    runtime.gates["a"] = anyio.Event()
    async with Assistant(directory, runtime, pub) as assistant:
        da, db = FakeDelivery(), FakeDelivery()
        await assistant.submit(msg("a", "first message"), da)
        await runtime.reached["a"].wait()
        await assistant.submit(msg("b", "second message"), db)
        started = [e for e in pub.events if isinstance(e, GenerationStarted)]
        assert [s.queue_position for s in started] == [0, 1]
        assert runtime.running == ["a"]  # b waits for a
        runtime.gates["a"].set()
        await db.acked.wait()
    assert runtime.running == ["a", "b"]
    second = runtime.requests[1].messages
    assert [t.content for t in second[1:]] == ["first message", "first message", "second message"]


async def test_topics_run_concurrently(parts):
    directory, runtime, pub = parts
    runtime.gates["a"] = anyio.Event()
    async with Assistant(directory, runtime, pub) as assistant:
        da, db = FakeDelivery(), FakeDelivery()
        await assistant.submit(msg("a", "held here", topic="t1"), da)
        await runtime.reached["a"].wait()
        await assistant.submit(msg("b", "free to go", topic="t2"), db)
        await db.acked.wait()  # t2 finishes while t1 is still held
        assert not da.acked.is_set()
        runtime.gates["a"].set()
        await da.acked.wait()


async def test_full_queue_answers_busy(parts):
    directory, runtime, pub = parts
    runtime.gates["a"] = anyio.Event()
    async with Assistant(directory, runtime, pub, AssistantSettings(max_queue_per_model=1)) as assistant:
        da, db = FakeDelivery(), FakeDelivery()
        await assistant.submit(msg("a", "slow one"), da)
        await runtime.reached["a"].wait()
        await assistant.submit(msg("b", "too many", topic="t2"), db)
        assert db.acked.is_set()
        failed = [e for e in pub.events if isinstance(e, GenerationFailed)]
        assert failed[0].request_id == "b" and failed[0].error.code == ErrorCode.BUSY
        runtime.gates["a"].set()
        await da.acked.wait()


async def test_unknown_model_fails_with_model_not_found(parts):
    directory, runtime, pub = parts
    async with Assistant(directory, runtime, pub) as assistant:
        d = FakeDelivery()
        await assistant.submit(msg("a", model_id="nope"), d)
        assert d.acked.is_set()
    (failed,) = pub.events
    assert isinstance(failed, GenerationFailed) and failed.error.code == ErrorCode.MODEL_NOT_FOUND


async def test_engine_error_becomes_generation_failed_and_lane_survives(parts):
    directory, runtime, pub = parts
    runtime.fail_with = LamaError(ErrorCode.INTERNAL, "worker died")
    async with Assistant(directory, runtime, pub) as assistant:
        d = FakeDelivery()
        await assistant.submit(msg("a"), d)
        await d.acked.wait()
        runtime.fail_with = None
        d2 = FakeDelivery()
        await assistant.submit(msg("b", "still here"), d2)
        await d2.acked.wait()
    failed = [e for e in pub.events if isinstance(e, GenerationFailed)]
    assert [f.request_id for f in failed] == ["a"]
    assert pub.messages[-1].text == "still here"


async def test_cancel_running_generation_keeps_partial_text(parts):
    directory, runtime, pub = parts
    runtime.gates["a"] = anyio.Event()
    async with Assistant(directory, runtime, pub) as assistant:
        d = FakeDelivery()
        await assistant.submit(msg("a", "alpha beta gamma"), d)
        await runtime.reached["a"].wait()
        reply = await assistant.cancel("t1")
        assert reply.cancelled and reply.request_id == "a"
        await d.acked.wait()
    cancelled = [e for e in pub.events if isinstance(e, GenerationCancelled)]
    assert cancelled[0].text == "alpha" and pub.messages == []
    assert directory.unanswered == [("a", "cancelled")]


async def test_interrupt_mode_cancels_running_for_a_new_message(parts):
    directory, runtime, pub = parts
    runtime.gates["a"] = anyio.Event()
    async with Assistant(directory, runtime, pub, AssistantSettings(on_new_message="interrupt")) as assistant:
        da, db = FakeDelivery(), FakeDelivery()
        await assistant.submit(msg("a", "long answer here"), da)
        await runtime.reached["a"].wait()
        await assistant.submit(msg("b", "new question"), db)
        await db.acked.wait()
    assert any(isinstance(e, GenerationCancelled) and e.request_id == "a" for e in pub.events)
    assert pub.messages[-1].reply_to == "b"


async def test_progress_acks_keep_waiting_messages_alive(parts):
    directory, runtime, pub = parts
    runtime.gates["a"] = anyio.Event()
    async with Assistant(directory, runtime, pub, AssistantSettings(progress_interval=0.01)) as assistant:
        da, db = FakeDelivery(), FakeDelivery()
        await assistant.submit(msg("a", "held here"), da)
        await runtime.reached["a"].wait()
        await assistant.submit(msg("b", "waiting"), db)
        with anyio.fail_after(5):
            await da.progressed_twice.wait()
            await db.progressed_twice.wait()
        runtime.gates["a"].set()
        await db.acked.wait()


async def test_model_or_topic_system_prompt_beats_the_default(parts):
    directory, runtime, pub = parts

    async def with_prompt(topic, requested):
        return ModelRef(model_id="m1", person_id=AI, config=MODEL.config, system_prompt="Answer in French.")

    directory.resolve_model = with_prompt
    async with Assistant(directory, runtime, pub, AssistantSettings(system_prompt="default")) as assistant:
        d = FakeDelivery()
        await assistant.submit(msg("a", "bonjour"), d)
        await d.acked.wait()
    assert runtime.requests[0].messages[0] == ChatTurn("system", "Answer in French.")


async def test_a_bad_grammar_is_refused_before_generation_started(parts):
    directory, runtime, pub = parts
    async with Assistant(directory, runtime, pub) as assistant:
        bad, good, plain = FakeDelivery(), FakeDelivery(), FakeDelivery()
        await assistant.submit(msg("a", "one two", params=GenerationParams(grammar="bad")), bad)
        await assistant.submit(msg("b", "one two", params=GenerationParams(grammar='root ::= "x"')), good)
        await assistant.submit(msg("c", "one two"), plain)
        await plain.acked.wait()
    assert bad.acked.is_set() and good.acked.is_set()
    by_request = collections.defaultdict(list)
    for e in pub.events:
        by_request[e.request_id].append(type(e))
    assert by_request["a"] == [GenerationFailed]
    (failed,) = [e for e in pub.events if e.request_id == "a"]
    assert failed.error.details["field"] == "params.grammar"
    assert by_request["b"] == [GenerationStarted, GenerationCompleted]
    assert by_request["c"] == [GenerationStarted, GenerationCompleted]
    assert [s.grammar for s in runtime.checked] == ["bad", 'root ::= "x"']  # the plain message needs no check
    assert [r.request_id for r in runtime.requests] == ["b", "c"]
