"""handlers/topic_analysis.py with in-memory ports: when an analysis is due, what it asks, how its
answer is held to the limits, and how it yields to users' messages (issue 13 part 2). The real
model and bus are in tests/test_e2e_analysis.py."""

from __future__ import annotations

import json
from typing import AsyncIterator

import anyio
import pytest

from engine.types import ChatTurn, GenerationResult, ModelConfig, TokenChunk
from handlers.assistant import Assistant
from handlers.ports import ModelRef
from handlers.topic_analysis import (
    SCHEMA,
    AnalysisSettings,
    InvalidAnalysis,
    TopicAnalyser,
    TopicState,
    is_due,
    parse_answer,
)
from tests.conftest import entered_in_own_task
from tests.test_assistant_unit import FakeDelivery, FakeDirectory, FakePublisher, FakeRuntime, msg
from wire.errors import ErrorCode, LamaError
from wire.messages import Timing, TopicAnalysed, Usage

MODEL = ModelRef(model_id="m1", person_id="ai", config=ModelConfig(model_path="/x.gguf"))
GOOD = {"title": "Sky colours", "keywords": ["sky", "blue", "light"], "summary": "Why the sky is blue. Rayleigh "
        "scattering explains it. A third sentence goes.", "language": "en"}


def answer(**changes: object) -> str:
    return json.dumps({**GOOD, **changes})


# ---------------------------------------------------------------------------------------- the answer


def test_a_good_answer_is_kept_and_its_summary_cut_to_two_sentences():
    a = parse_answer(answer(title="  Sky   colours "))
    assert a.title == "Sky colours" and a.keywords == ["sky", "blue", "light"] and a.language == "en"
    assert a.summary == "Why the sky is blue. Rayleigh scattering explains it."


@pytest.mark.parametrize(("changes", "why"), [
    ({"keywords": ["Brot", "brot", "Brot "]}, "distinct keywords"),
    ({"language": "english"}, "BCP 47"),
    ({"title": "x" * 61}, "title of 61"),
    ({"title": "   "}, "title of 0"),
])
def test_an_answer_past_the_limits_is_invalid(changes, why):
    with pytest.raises(InvalidAnalysis, match=why):
        parse_answer(answer(**changes))


def test_an_answer_that_is_not_the_schemas_json_is_invalid():
    with pytest.raises(InvalidAnalysis, match="not the schema"):
        parse_answer('{"title": "cut off')
    with pytest.raises(InvalidAnalysis, match="not the schema"):
        parse_answer(json.dumps({"title": "no keywords"}))


def test_the_schema_states_the_limits():
    props = SCHEMA["properties"]
    assert props["title"]["maxLength"] == 60  # type: ignore[index]
    assert (props["keywords"]["minItems"], props["keywords"]["maxItems"]) == (3, 7)  # type: ignore[index]
    assert SCHEMA["required"] == ["title", "keywords", "summary", "language"]


# ---------------------------------------------------------------------------------------- when


def state(replies: int, analysed: int | None = None, enabled: bool = True) -> TopicState:
    return TopicState(replies, f"r{replies}" if replies else None, analysed, enabled)


def test_due_after_the_first_reply_then_every_n():
    assert not is_due(state(0), 10, None)
    assert is_due(state(1), 10, None)
    assert not is_due(state(10, analysed=1), 10, None)
    assert is_due(state(11, analysed=1), 10, None)
    assert not is_due(state(5, enabled=False), 10, None)


def test_a_failed_attempt_waits_for_n_more_replies():
    assert not is_due(state(1), 10, attempted=1)
    assert not is_due(state(2), 10, attempted=1)
    assert is_due(state(11), 10, attempted=1)
    assert not is_due(state(12, analysed=3), 10, attempted=11)


# ---------------------------------------------------------------------------------------- scheduling


class FakeStore:
    def __init__(self) -> None:
        self.states: dict[str, TopicState] = {}
        self.recorded: list[tuple[str, object]] = []
        self.model_of: dict[str, ModelRef] = {}

    def topic_state(self, topic):
        return self.states.get(topic)

    async def resolve_model(self, topic):
        return self.model_of.get(topic, MODEL)

    async def history(self, topic):
        return [ChatTurn("user", "Why is the sky blue?"), ChatTurn("assistant", "Rayleigh scattering.")]

    async def record_analysis(self, topic, analysis):
        self.recorded.append((topic, analysis))
        self.states[topic] = self.states[topic]._replace(analysed_reply_count=analysis.reply_count)
        return analysis


class AnalysisRuntime:
    """Answers an analysis with ``text`` after one token; can hold it at a gate; sees cancellation."""

    def __init__(self) -> None:
        self.text = answer()
        self.fail: LamaError | None = None
        self.gate: anyio.Event | None = None
        self.requests: list = []
        self.cancelled = 0
        self.reached = anyio.Event()

    async def generate_stream(self, model, request) -> AsyncIterator[TokenChunk | GenerationResult]:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        yield TokenChunk("{")
        self.reached.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
        except BaseException:
            self.cancelled += 1
            raise
        yield GenerationResult(text=self.text, thinking="", tokens=20, finish_reason="stop",
                               timing=Timing(0, 1, 1, 1, 1), usage=Usage(1, 20, 21))

    async def cancel(self, request_id):
        return False

    async def check(self, model, sampling):
        pass


@pytest.fixture
async def analyser_parts():
    store, runtime, pub, outcomes = FakeStore(), AnalysisRuntime(), FakePublisher(), []
    async with entered_in_own_task(TopicAnalyser(store, runtime, pub, AnalysisSettings(every=2, node_id="n1", idle_delay=0.0),
                                                 on_outcome=lambda m, o: outcomes.append((m, o)))) as analyser:
        yield analyser, store, runtime, pub, outcomes


async def test_an_analysis_waits_for_the_model_to_be_idle_then_is_recorded_and_published(analyser_parts):
    analyser, store, runtime, pub, outcomes = analyser_parts
    store.states["t1"] = state(1)
    analyser.user_waiting("m1")
    analyser.replied("t1", "m1", "r1")
    await anyio.sleep(0.05)  # would be long enough for the fake to run, had it been started
    assert runtime.requests == [] and analyser.stats()["pending"] == {"m1": ["t1"]}
    analyser.user_done("m1")
    with anyio.fail_after(5):
        await analyser.idle.wait()
    (request,) = runtime.requests
    assert request.conversation == "t1" and request.sampling.json_schema == SCHEMA
    assert request.sampling.seed == 0 and request.messages[-1].role == "user"
    assert [t.content for t in request.messages[1:3]] == ["Why is the sky blue?", "Rayleigh scattering."]
    ((topic, analysis),) = store.recorded
    assert topic == "t1" and analysis.based_on_message_id == "r1" and analysis.reply_count == 1
    (event,) = pub.events
    assert isinstance(event, TopicAnalysed) and event.topic == "t1" and event.title == "Sky colours"
    assert event.based_on_message_id == "r1" and event.node_id == "n1" and event.keywords == ["sky", "blue", "light"]
    assert pub.dedup_ids == ["t1.analysed.r1"]
    assert outcomes == [("m1", "completed")]
    # Not due again until two more replies (every=2).
    store.states["t1"] = state(2, analysed=1)
    analyser.replied("t1", "m1", "r2")
    assert analyser.idle.is_set() and len(runtime.requests) == 1


async def test_a_users_message_preempts_a_running_analysis_which_runs_again_when_idle(analyser_parts):
    analyser, store, runtime, pub, outcomes = analyser_parts
    store.states["t1"] = state(1)
    runtime.gate = anyio.Event()
    analyser.replied("t1", "m1", "r1")
    with anyio.fail_after(5):
        await runtime.reached.wait()
    assert analyser.running() == {"m1": "t1"}
    analyser.user_waiting("m1")  # a user's message for the same model is accepted
    with anyio.fail_after(5):
        while runtime.cancelled == 0:
            await anyio.sleep(0.01)
    assert analyser.running() == {} and store.recorded == []
    assert outcomes == [("m1", "preempted")]
    runtime.gate.set()
    analyser.user_done("m1")
    with anyio.fail_after(5):
        await analyser.idle.wait()
    assert outcomes == [("m1", "preempted"), ("m1", "completed")] and len(store.recorded) == 1


async def test_another_models_user_does_not_preempt(analyser_parts):
    analyser, store, runtime, pub, outcomes = analyser_parts
    store.states["t1"] = state(1)
    runtime.gate = anyio.Event()
    analyser.replied("t1", "m1", "r1")
    with anyio.fail_after(5):
        await runtime.reached.wait()
    analyser.user_waiting("m2")
    runtime.gate.set()
    with anyio.fail_after(5):
        await analyser.idle.wait()
    assert runtime.cancelled == 0 and outcomes == [("m1", "completed")]


@pytest.mark.parametrize(("fail", "text", "outcome"), [
    (LamaError(ErrorCode.INTERNAL, "worker died"), None, "failed"),
    (None, answer(keywords=["a", "a", "a"]), "invalid"),
])
async def test_a_failed_analysis_is_counted_and_not_retried_until_n_more_replies(analyser_parts, fail, text, outcome):
    analyser, store, runtime, pub, outcomes = analyser_parts
    runtime.fail = fail
    runtime.text = text or runtime.text
    store.states["t1"] = state(1)
    analyser.replied("t1", "m1", "r1")
    with anyio.fail_after(5):
        await analyser.idle.wait()
    assert outcomes == [("m1", outcome)] and store.recorded == [] and pub.events == []
    store.states["t1"] = state(2)
    analyser.replied("t1", "m1", "r2")  # one more reply: not due (every=2 after the failed attempt)
    assert analyser.idle.is_set() and len(runtime.requests) == 1
    runtime.fail, runtime.text = None, answer()
    store.states["t1"] = state(3)
    analyser.replied("t1", "m1", "r3")
    with anyio.fail_after(5):
        await analyser.idle.wait()
    assert outcomes[-1] == ("m1", "completed") and store.recorded[-1][1].based_on_message_id == "r3"


async def test_a_topic_switched_off_is_not_analysed(analyser_parts):
    analyser, store, runtime, pub, outcomes = analyser_parts
    store.states["t1"] = state(1, enabled=False)
    analyser.replied("t1", "m1", "r1")
    assert analyser.idle.is_set() and runtime.requests == [] and outcomes == []


# ---------------------------------------------------------------------------------------- the assistant's hooks


class RecordingBackground:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def user_waiting(self, model_id):
        self.calls.append(("waiting", model_id))

    def user_done(self, model_id):
        self.calls.append(("done", model_id))

    def replied(self, topic, model_id, reply_id):
        self.calls.append(("replied", topic, model_id))


async def test_the_assistant_tells_its_background_as_messages_come_and_go():
    directory, runtime, pub, background = FakeDirectory(), FakeRuntime(), FakePublisher(), RecordingBackground()
    runtime.gates["a"] = anyio.Event()
    async with Assistant(directory, runtime, pub, background=background) as assistant:
        first, second = FakeDelivery(), FakeDelivery()
        await assistant.submit(msg("a", "one two three"), first)
        await assistant.submit(msg("b", "four five", topic="t2"), second)
        # Both are waiting before either is answered: the background lets go of m1 at acceptance.
        assert background.calls == [("waiting", "m1"), ("waiting", "m1")]
        runtime.gates["a"].set()
        await first.acked.wait()
        await second.acked.wait()
    replied = [c for c in background.calls if c[0] == "replied"]
    assert sorted(replied) == [("replied", "t1", "m1"), ("replied", "t2", "m1")]
    assert background.calls.count(("done", "m1")) == 2
    # A reply is reported before its message stops counting as waiting, so an analysis never starts
    # between the two.
    for topic in ("t1", "t2"):
        assert background.calls.index(("replied", topic, "m1")) < len(background.calls) - 1


async def test_an_analysis_waits_for_the_model_to_stay_idle_a_moment():
    """Messages in a stream leave the model idle for milliseconds between them: no analysis starts there."""
    store, runtime, pub = FakeStore(), AnalysisRuntime(), FakePublisher()
    store.states["t1"] = state(1)
    async with entered_in_own_task(TopicAnalyser(store, runtime, pub,
                                                 AnalysisSettings(every=2, idle_delay=0.2))) as analyser:
        analyser.user_waiting("m1")
        analyser.replied("t1", "m1", "r1")
        for _ in range(5):  # idle for a few milliseconds at a time, as between the messages of a burst
            analyser.user_done("m1")
            await anyio.sleep(0.01)
            analyser.user_waiting("m1")
        assert runtime.requests == [] and analyser.running() == {}
        analyser.user_done("m1")
        with anyio.fail_after(5):
            await analyser.idle.wait()
        assert len(runtime.requests) == 1 and len(store.recorded) == 1


async def test_a_topic_whose_own_model_is_busy_waits_for_that_model(analyser_parts):
    """The reply came from a model the message asked for (m1); the topic's own model (m2) is the one
    asked for the analysis, so it is m2's idleness that counts."""
    analyser, store, runtime, pub, outcomes = analyser_parts
    m2 = ModelRef(model_id="m2", person_id="ai2", config=ModelConfig(model_path="/y.gguf"))
    store.states["t1"] = state(1)
    store.model_of["t1"] = m2
    analyser.user_waiting("m2")
    analyser.replied("t1", "m1", "r1")
    with anyio.fail_after(5):
        while analyser.stats()["pending"] != {"m2": ["t1"]}:
            await anyio.sleep(0.01)
    assert runtime.requests == [] and outcomes == [] and not analyser.idle.is_set()
    analyser.user_done("m2")
    with anyio.fail_after(5):
        await analyser.idle.wait()
    assert outcomes == [("m2", "completed")] and store.recorded[0][1].model_id == "m2"
