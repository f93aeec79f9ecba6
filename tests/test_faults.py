"""Fault injection against real processes: a SIGKILLed ``lamabus serve``, a restarted
nats-server, duplicates, concurrent topics, messages posted while lamabus is down.

Every reply is checked in the JetStream log itself (the LAMA_TOPICS stream): a
message is answered exactly once when the stream holds exactly one AI
``chat.message`` with ``replyTo`` = its id and one ``generation.completed``.
The bundled model with greedy sampling and a few tokens keeps each test short.
"""

from __future__ import annotations

import contextlib
import signal
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import anyio
import pytest
from nats.js.errors import NotFoundError

from bench.serve_process import ServeProcess, group_members
from bus.config import Settings
from bus.broker.connection import connect
from bus.node.intake import CONSUMER, StreamLimits, ensure_topics_stream
from bus.node.publisher import MSG_ID
from bus.replay.command import records
from bus.subjects import Subjects
from handlers.assistant import reply_id_for
from tests.conftest import entered_in_own_task
from wire.messages import (
    ChatMessage,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    GenerationToken,
    decode_topic_event,
    encode,
)
from wire.params import GenerationParams

pytestmark = [pytest.mark.slow, pytest.mark.model]

S = Subjects()
#: Short enough to be quick, long enough to still be running a moment after the first token.
PARAMS = GenerationParams(max_tokens=32, temperature=0.0, seed=1, stop=[])
QUICK = GenerationParams(max_tokens=8, temperature=0.0, seed=1)
COUNTING = "Count from 1 to 100, separated by commas."
#: Redelivery of an unacknowledged message comes this many seconds after its last ack/progress.
ACK_WAIT = 3.0


def chat(topic: str, text: str, params: GenerationParams = PARAMS, mid: str | None = None) -> ChatMessage:
    return ChatMessage(id=mid or str(uuid.uuid4()), topic=topic, author_id="tester", text=text,
                       sent_at=datetime.now(timezone.utc), params=params)


async def post(js, message: ChatMessage, *, dedup: bool = True) -> int:
    ack = await js.publish(S.msg(message.topic), encode(message), headers={MSG_ID: message.id} if dedup else None)
    return ack.seq


async def stored(js, topic: str) -> list:
    async with contextlib.aclosing(records(js, topic)) as recs:
        return [r.event async for r in recs]


def answers(events: list, mid: str) -> tuple[list[ChatMessage], list[GenerationCompleted]]:
    """The AI replies to ``mid`` and the completions of ``mid`` in the log."""
    replies = [e for e in events if isinstance(e, ChatMessage) and e.reply_to == mid]
    done = [e for e in events if isinstance(e, GenerationCompleted) and e.request_id == mid]
    return replies, done


def assert_answered_once(events: list, topic: str, mid: str) -> GenerationCompleted:
    replies, done = answers(events, mid)
    assert len(replies) == 1, replies
    assert len(done) == 1, done
    (reply,), (completed,) = replies, done
    assert reply.id == completed.message_id == reply_id_for(topic, mid)
    assert reply.author_id == completed.author_id and reply.text == completed.text
    assert not [e for e in events if isinstance(e, GenerationFailed) and e.request_id == mid]
    return completed


async def wait_end(js, topic: str, mid: str, timeout: float = 60.0):
    """The event that ends ``mid`` (completed/failed/cancelled), read from the log: survives broker restarts."""
    with anyio.fail_after(timeout):
        async with contextlib.aclosing(records(js, topic, follow=True, idle=0.5)) as recs:
            async for rec in recs:
                match rec.event:
                    case GenerationCompleted(request_id=rid) | GenerationFailed(request_id=rid) | \
                            GenerationCancelled(request_id=rid) if rid == mid:
                        return rec.event
    raise AssertionError("unreachable")


async def wait_settled(js, timeout: float = 30.0) -> None:
    """Until the service's durable consumer has delivered and had acknowledged every message."""
    with anyio.fail_after(timeout):
        while True:
            try:
                info = await js.consumer_info(S.stream_name, CONSUMER)
            except NotFoundError:
                info = None
            if info is not None and not info.num_pending and not info.num_ack_pending:
                return
            await anyio.sleep(0.1)  # polling a condition, with a deadline


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "lamabus.toml"
    path.write_text(f"[lamabus]\nack_wait = {ACK_WAIT}\nlog_level = \"info\"\n")
    return path


@pytest.fixture
async def serve(tmp_path: Path, nats_url: str, config_file: Path):
    started: list[ServeProcess] = []

    def make() -> ServeProcess:
        proc = ServeProcess(nats_url, tmp_path / "data", config_file, strict=True)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        await proc.aclose()


@pytest.fixture
async def nc(nats_url: str):
    # Reconnects like the service, so it outlives a broker restart.
    nc = await connect(nats_url, name="fault-test")
    try:
        yield nc
    finally:
        await nc.close()


@pytest.fixture
def js(nc):
    return nc.jetstream()


@contextlib.asynccontextmanager
async def in_process_service(nats_url: str, data_dir: Path, ack_wait: float = ACK_WAIT):
    from bus.node.app import LamabusService

    settings = Settings(nats_url=nats_url, data_dir=str(data_dir), ack_wait=ack_wait)
    async with entered_in_own_task(LamabusService(settings)) as svc:
        yield svc


async def first_token(nc, topic: str, mid: str, post_it) -> GenerationToken:
    """Post (via ``post_it``) and return the first streamed token of ``mid``."""
    sub = await nc.subscribe(S.tok(topic))
    try:
        await nc.flush()
        await post_it()
        with anyio.fail_after(60):
            while True:
                token = decode_topic_event((await sub.next_msg(timeout=60)).data)
                if isinstance(token, GenerationToken) and token.request_id == mid:
                    return token
    finally:
        await sub.unsubscribe()


# -- (a) lamabus serve killed mid-generation ---------------------------------------


async def test_serve_killed_mid_generation_answers_once_after_restart(serve, nc, js):
    topic = "crash"
    service = serve()
    await service.start()
    message = chat(topic, COUNTING)
    await first_token(nc, topic, message.id, lambda: post(js, message))
    assert await service.kill() == -signal.SIGKILL
    # The engine worker dies with its parent (no orphan holding the model).
    with anyio.fail_after(10):
        while group_members(service.pid):
            await anyio.sleep(0.05)
    # Killed mid-generation: nothing answered yet.
    assert answers(await stored(js, topic), message.id) == ([], [])

    await service.start()  # the same data dir: the registry remembers, JetStream redelivers
    ended = await wait_end(js, topic, message.id)
    assert isinstance(ended, GenerationCompleted), ended
    await wait_settled(js)
    completed = assert_answered_once(await stored(js, topic), topic, message.id)
    assert completed.tokens > 0 and completed.text
    assert await service.stop() == 0, service.log_tail()


async def test_with_default_settings_a_restarted_node_answers_within_seconds(tmp_path, nats_url, nc, js):
    """Quick recovery (issue 16): the message a killed node was working on is answered soon after
    the restart, not after a long ack_wait. Default settings, only the log level set."""
    config = tmp_path / "defaults.toml"
    config.write_text('[lamabus]\nlog_level = "info"\n')
    service = ServeProcess(nats_url, tmp_path / "data", config, strict=True)
    try:
        topic = "recover"
        await service.start()
        message = chat(topic, COUNTING)
        await first_token(nc, topic, message.id, lambda: post(js, message))
        assert await service.kill() == -signal.SIGKILL
        killed = time.monotonic()
        await service.start()
        ended = await wait_end(js, topic, message.id)
        recovery = time.monotonic() - killed
        assert isinstance(ended, GenerationCompleted), ended
        # Within the default ack_wait (plus the restart and the generation), far below the old 30 s.
        assert recovery < Settings().ack_wait + 15, recovery
        assert await service.stop() == 0, service.log_tail()
    finally:
        await service.aclose()


# -- (e) durable intake: posted while lamabus is down ---------------------------------


async def test_message_posted_while_down_is_answered_on_start(serve, js):
    topic = "offline"
    service = serve()
    await service.start()  # creates the stream and the durable consumer
    assert await service.stop() == 0, service.log_tail()
    message = chat(topic, "Say hello.", QUICK)
    await post(js, message)
    assert answers(await stored(js, topic), message.id) == ([], [])
    await service.start()
    ended = await wait_end(js, topic, message.id)
    assert isinstance(ended, GenerationCompleted), ended
    await wait_settled(js)
    assert_answered_once(await stored(js, topic), topic, message.id)
    assert await service.stop() == 0, service.log_tail()


# -- (b) nats-server restarted mid-stream ----------------------------------------------


async def test_broker_restart_mid_stream_message_answered_once(tmp_path, nats_server, nc, js):
    topic = "broker-blip"
    async with in_process_service(nats_server.url, tmp_path / "data") as svc:
        message = chat(topic, COUNTING)
        await first_token(nc, topic, message.id, lambda: post(js, message))
        await nats_server.kill()
        await nats_server.start()  # the same port and store
        ended = await wait_end(js, topic, message.id)
        assert isinstance(ended, GenerationCompleted), ended
        await wait_settled(js)
        assert_answered_once(await stored(js, topic), topic, message.id)
        # The service is whole: the next message is answered too.
        follow_up = chat(topic, "Say hello.", QUICK)
        await post(js, follow_up)
        assert isinstance(await wait_end(js, topic, follow_up.id), GenerationCompleted)
        assert svc.assistant is not None and not svc.assistant.stats()["lanes"].get(topic)


async def test_broker_down_longer_than_publish_timeout_reply_published_after_restart(tmp_path, nats_server, nc, js):
    """The reply is recorded while the broker is away, its publish gives up; the redelivery publishes it."""
    topic = "broker-outage"
    async with in_process_service(nats_server.url, tmp_path / "data") as svc:
        assert svc.registry is not None and svc.assistant is not None
        message = chat(topic, COUNTING)
        await first_token(nc, topic, message.id, lambda: post(js, message))
        await nats_server.kill()
        # Broker away: the answer is recorded, then publishing it fails and the job leaves its lane, unacked.
        with anyio.fail_after(30):
            while not (await svc.registry.has_replied(topic, message.id) and topic not in svc.assistant.stats()["lanes"]):
                await anyio.sleep(0.1)
        await nats_server.start()
        ended = await wait_end(js, topic, message.id)
        assert isinstance(ended, GenerationCompleted), ended
        await wait_settled(js)
        assert_answered_once(await stored(js, topic), topic, message.id)
        assert svc.assistant.counters["errors"] >= 1  # the publish that gave up
        assert svc.assistant.counters["duplicates"] >= 1  # answered from the record, not generated again


# -- (c) the same message twice ---------------------------------------------------------


async def test_same_message_twice_gets_one_reply(tmp_path, nats_url, js):
    topic = "dupes"
    async with in_process_service(nats_url, tmp_path / "data") as svc:
        assert svc.assistant is not None
        message = chat(topic, "Say hello.", QUICK)
        first = await post(js, message)
        assert await post(js, message) == first  # the broker's duplicate window drops it
        third = await post(js, message, dedup=False)  # past any window: stored again, must still not be answered
        assert third > first
        assert isinstance(await wait_end(js, topic, message.id), GenerationCompleted)
        await wait_settled(js)
        events = await stored(js, topic)
        assert len([e for e in events if isinstance(e, ChatMessage) and e.id == message.id]) == 2
        assert_answered_once(events, topic, message.id)
        assert len([e for e in events if isinstance(e, GenerationStarted)]) == 1
        assert svc.assistant.counters["duplicates"] >= 1


# -- (d) two topics at once ---------------------------------------------------------------


async def test_two_topics_at_once_keep_their_own_order(tmp_path, nats_url, nc, js):
    topics = ("left", "right")
    async with in_process_service(nats_url, tmp_path / "data"):
        sent: dict[str, list[str]] = {t: [] for t in topics}
        sub = await nc.subscribe(f"{S.prefix}.topic.*.evt")
        await nc.flush()
        for i in range(3):
            for topic in topics:
                message = chat(topic, f"Say the number {i + 1}.", QUICK)
                sent[topic].append(message.id)
                await post(js, message)
        done: dict[str, list[str]] = {t: [] for t in topics}
        finished: list[str] = []  # topics in the order their completions came
        with anyio.fail_after(90):
            while len(finished) < 6:
                event = decode_topic_event((await sub.next_msg(timeout=90)).data)
                assert not isinstance(event, GenerationFailed), event
                if isinstance(event, GenerationCompleted):
                    done[event.topic].append(event.request_id)
                    finished.append(event.topic)
        await sub.unsubscribe()
        # At once: neither topic waited for the other to finish all of its messages.
        assert finished.index("left") < 5 - finished[::-1].index("right")
        assert finished.index("right") < 5 - finished[::-1].index("left")
        await wait_settled(js)
        for topic in topics:
            assert done[topic] == sent[topic]
            events = await stored(js, topic)
            replies = [e for e in events if isinstance(e, ChatMessage) and e.reply_to is not None]
            assert [r.reply_to for r in replies] == sent[topic]
            # Each reply is stored after the message it answers.
            order = [e.id for e in events if isinstance(e, ChatMessage)]
            for mid in sent[topic]:
                assert order.index(mid) < order.index(reply_id_for(topic, mid))
            for mid in sent[topic]:
                assert_answered_once(events, topic, mid)


# -- restart with changed settings ------------------------------------------------------------


async def test_restart_with_a_changed_ack_wait_applies_it(tmp_path, nats_url, js):
    # The durable consumer outlives the service; its ack_wait must follow the configuration.
    for ack_wait in (30.0, ACK_WAIT, 60.0):
        async with in_process_service(nats_url, tmp_path / "data", ack_wait=ack_wait):
            info = await js.consumer_info(S.stream_name, CONSUMER)
            assert info.config.ack_wait == ack_wait


async def test_restart_keeps_stream_limits_an_operator_set(js):
    await ensure_topics_stream(js, S, duplicate_window=120)
    config = (await js.stream_info(S.stream_name)).config
    config.max_age, config.max_bytes = 3600.0, 10**9
    await js.update_stream(config)
    await ensure_topics_stream(js, S, duplicate_window=300)  # what every start does
    config = (await js.stream_info(S.stream_name)).config
    assert (config.max_age, config.max_bytes, config.duplicate_window) == (3600.0, 10**9, 300.0)
    assert sorted(config.subjects) == sorted([S.all_msg, S.all_evt, S.rejected])


async def test_stream_limits_have_defaults_and_settings_that_apply_on_every_start(js):
    await ensure_topics_stream(js, S, duplicate_window=120)
    config = (await js.stream_info(S.stream_name)).config
    defaults = StreamLimits()
    assert (config.max_age, config.max_bytes) == (defaults.default_max_age, defaults.default_max_bytes)
    # An operator's setting (topics_max_age / topics_max_bytes) wins over what the stream has.
    await ensure_topics_stream(js, S, duplicate_window=120, limits=StreamLimits(max_age=600.0, max_bytes=1 << 20))
    config = (await js.stream_info(S.stream_name)).config
    assert (config.max_age, config.max_bytes) == (600.0, 1 << 20)
    # ...and a start without those settings leaves them as they are.
    await ensure_topics_stream(js, S, duplicate_window=120)
    config = (await js.stream_info(S.stream_name)).config
    assert (config.max_age, config.max_bytes) == (600.0, 1 << 20)
