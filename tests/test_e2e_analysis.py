"""Topic analysis on a real nats-server with the bundled model (issue 13 part 2): the event on the
topic, the record in the registry (and its replay), the metric, the schedule, giving way to users."""

from __future__ import annotations

import asyncio

import anyio
import msgspec
import pytest

from domain.projections import Projections
from handlers.topic_analysis import KEYWORDS_MAX, KEYWORDS_MIN, TITLE_MAX
from tests.conftest import entered_in_own_task
from wire.api import TopicGet
from wire.messages import GenerationCompleted, TopicAnalysed, decode_topic_event
from wire.params import GenerationParams

pytestmark = pytest.mark.model

GREEDY = GenerationParams(temperature=0.0, max_tokens=40, seed=1)
QUESTION = "Tell me about black holes."


@pytest.fixture
def settings(settings):
    return msgspec.structs.replace(settings, analysis=True, analysis_every=2, web="off")


async def ask(client, topic: str, text: str = QUESTION) -> GenerationCompleted:
    items = [i async for i in client.ask(topic, text, params=GREEDY, timeout=120)]
    assert isinstance(items[-1], GenerationCompleted)
    return items[-1]


async def analysed(queue: asyncio.Queue, timeout: float = 120.0) -> TopicAnalysed:
    with anyio.fail_after(timeout):
        while True:
            event = await queue.get()
            if isinstance(event, TopicAnalysed):
                return event


@pytest.mark.timeout(900)  # minutes of model work; 2 to 3 on a busy 2-core machine
async def test_a_topic_is_analysed_after_its_first_reply_then_every_n(service, client):
    topic = "space"
    queue: asyncio.Queue = asyncio.Queue()

    async def on_evt(msg) -> None:
        queue.put_nowait(decode_topic_event(msg.data))

    sub = await client.nc.subscribe(service.subjects.evt(topic), cb=on_evt)
    await client.nc.flush()
    first = await ask(client, topic)
    event = await analysed(queue)
    assert event.topic == topic and event.based_on_message_id == first.message_id and event.reply_count == 1
    assert 1 <= len(event.title) <= TITLE_MAX and KEYWORDS_MIN <= len(event.keywords) <= KEYWORDS_MAX
    assert event.summary and event.language and event.model_id == first.model_id
    assert event.node_id == service.settings.node_name
    info = (await client.call(TopicGet(topic_id=topic))).topic
    assert info.analysis is not None and info.analysis_enabled
    assert (info.analysis.title, list(info.analysis.keywords), info.analysis.summary, info.analysis.language,
            info.analysis.based_on_message_id) == (event.title, event.keywords, event.summary, event.language,
                                                   first.message_id)
    # Durable on the topic's stream, as the last event there.
    last = await client.js.get_last_msg(service.subjects.stream_name, service.subjects.evt(topic))
    assert decode_topic_event(last.data) == event
    # In the registry's log: a rebuild gives the same analysis.
    rebuilt = await Projections.rebuild(service.registry.store)
    assert rebuilt.topics[topic].analysis == service.registry.view.topics[topic].analysis == info.analysis
    exposition = service.metrics.exposition()[0].decode()
    assert f'lamabus_topic_analyses_total{{model="{first.model_id}",outcome="completed"}} 1.0' in exposition

    # every=2: the second reply is not enough, the third is. Had the second made it due, its analysis
    # would have been preempted by the third message (or finished), and counted.
    await ask(client, topic, "How big can they get?")
    finished = service.analyser.finished
    third = await ask(client, topic, "What is at the centre of one?")
    with anyio.fail_after(120):
        await finished.wait()
    # A second attempt, on the third reply. The small model may answer it with repeated keywords, which
    # is counted as invalid (and then nothing is recorded); otherwise it is the topic's analysis now.
    counters = service.analyser.counters
    assert counters["completed"] + counters["invalid"] == 2
    assert counters["failed"] == counters["preempted"] == 0
    latest = (await client.call(TopicGet(topic_id=topic))).topic.analysis
    if counters["completed"] == 2:
        again = await analysed(queue, timeout=5)
        assert again.based_on_message_id == third.message_id == latest.based_on_message_id
        assert again.reply_count == 3
    else:
        assert latest == info.analysis
    await sub.unsubscribe()


@pytest.mark.timeout(900)  # minutes of model work; 2 to 3 on a busy 2-core machine
async def test_an_analysis_gives_way_to_a_users_message_and_runs_again_after(service, client):
    analyser = service.analyser
    started = analyser.started
    await ask(client, "warm")  # its reply makes it due; the analysis starts once the model is idle
    with anyio.fail_after(120):
        await started.wait()
    assert analyser.running()
    reply = await ask(client, "other", "Say hello.")
    assert reply.text
    with anyio.fail_after(120):
        await analyser.idle.wait()
    assert analyser.counters["preempted"] >= 1
    assert analyser.counters["completed"] + analyser.counters["invalid"] == 2  # "warm" (again) and "other"
    assert service.registry.view.topics["other"].reply_count == 1


async def test_off_for_one_topic_and_for_the_service(service, client, settings):
    await service.registry.set_topic_analysis("quiet", False)
    await ask(client, "quiet")
    with anyio.fail_after(30):
        await service.analyser.idle.wait()
    assert sum(service.analyser.counters.values()) == 0
    info = (await client.call(TopicGet(topic_id="quiet"))).topic
    assert info.analysis is None and not info.analysis_enabled
