"""Several lamabus nodes on a 3-server NATS cluster (issue 11): real nats-servers on loopback routes, each node
connected to a different server, ``registry = "nats"``.

Every answer is checked in the LAMA_TOPICS stream itself: a message is answered exactly once when the stream
holds one AI ``chat.message`` with ``replyTo`` = its id and one ``generation.completed``; which node answered is
the completion's ``nodeId``.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import anyio
import nats
import pytest
import nats.errors
from nats.js.errors import NoStreamResponseError, NotFoundError, ServiceUnavailableError

from bench.serve_process import ServeProcess
from bus.node.cluster import bucket_name, partition_of, wanted_owner
from bus.config import Settings
from bus.node.publisher import MSG_ID
from bus.subjects import Subjects
from handlers.assistant import reply_id_for
from bench.nats_cluster import NatsCluster
from tests.conftest import entered_in_own_task
from wire.errors import ErrorCode, LamaError
from wire.messages import (
    ChatMessage,
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
PARTITIONS = Settings().partitions
ACK_WAIT = 3.0
QUICK = GenerationParams(max_tokens=2, temperature=0.0, seed=1)
LONG = GenerationParams(max_tokens=48, temperature=0.0, seed=1, stop=[])
MEDIUM = GenerationParams(max_tokens=12, temperature=0.0, seed=1, stop=[])
COUNTING = "Count from 1 to 100, separated by commas."


@pytest.fixture
async def cluster(tmp_path: Path):
    async with NatsCluster(tmp_path / "cluster", size=3) as c:
        yield c


@pytest.fixture
async def nc(cluster: NatsCluster):
    # The test's own client, on the third server, reconnecting fast to the others.
    nc = await nats.connect(servers=cluster.urls_from(3), dont_randomize=True, reconnect_time_wait=0.1,
                            max_reconnect_attempts=-1, connect_timeout=2)
    try:
        yield nc
    finally:
        await nc.close()


def node_settings(cluster: NatsCluster, server: int, node_id: str, base: Path, **extra) -> Settings:
    options = {"registry": "nats", "node_id": node_id, "ack_wait": ACK_WAIT, "web": "off", "metrics": "off", **extra}
    return Settings(nats_url=",".join(cluster.urls_from(server)), data_dir=str(base / node_id), **options)


@contextlib.asynccontextmanager
async def node(settings: Settings):
    from bus.node.app import LamabusService

    async with entered_in_own_task(LamabusService(settings)) as svc:
        yield svc


def chat(topic: str, text: str, params: GenerationParams = QUICK) -> ChatMessage:
    return ChatMessage(id=str(uuid.uuid4()), topic=topic, author_id="tester", text=text,
                       sent_at=datetime.now(timezone.utc), params=params)


async def post(js, message: ChatMessage) -> None:
    """Publish, again while the stream has no leader (a killed server): the same Nats-Msg-Id, stored once."""
    with anyio.fail_after(60):
        while True:
            try:
                await js.publish(S.msg(message.topic), encode(message), headers={MSG_ID: message.id})
                return
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError, ServiceUnavailableError,
                    NoStreamResponseError):
                await anyio.sleep(0.5)


async def owners(nc) -> dict[int, str]:
    """Partition -> lease holder, read from the cluster's bucket."""
    kv = await nc.jetstream().key_value(bucket_name(S))
    out = {}
    for p in range(PARTITIONS):
        with contextlib.suppress(Exception):
            out[p] = (await kv.get(f"part.{p}")).value.decode()
    return out


async def wait_owned_by(nc, nodes: set[str], timeout: float = 60.0) -> dict[int, str]:
    """Until every partition is held by the node rendezvous hashing gives it among ``nodes``."""
    with anyio.fail_after(timeout):
        while True:
            held = await owners(nc)
            if all(held.get(p) == wanted_owner(p, nodes) for p in range(PARTITIONS)):
                return held
            await anyio.sleep(0.2)  # polling the leases, with a deadline


def topics_of(node_id: str, nodes: set[str], n: int, prefix: str = "t") -> list[str]:
    """``n`` topic ids whose partition ``node_id`` owns among ``nodes``."""
    found, i = [], 0
    while len(found) < n:
        topic = f"{prefix}{i}"
        if wanted_owner(partition_of(topic, PARTITIONS), nodes) == node_id:
            found.append(topic)
        i += 1
    return found


async def topic_log(js, timeout: float = 60.0) -> list[tuple[str, object]]:
    """Every message of LAMA_TOPICS, in stream order, decoded (read again while a killed server's streams elect
    new leaders)."""
    with anyio.fail_after(timeout):
        while True:
            try:
                last = (await js.stream_info(S.stream_name)).state.last_seq
                out = []
                for seq in range(1, last + 1):
                    try:
                        raw = await js.get_msg(S.stream_name, seq)
                    except NotFoundError:
                        continue
                    out.append((raw.subject, decode_topic_event(raw.data)))
                return out
            except (ServiceUnavailableError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
                await anyio.sleep(0.5)  # no stream leader yet


def check_exactly_once(log: list[tuple[str, object]], sent: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each sent message answered once, replies in posting order per topic; returns topic -> answering nodes."""
    events = [e for _, e in log]
    nodes: dict[str, list[str]] = {}
    for topic, ids in sent.items():
        replies = [e for e in events if isinstance(e, ChatMessage) and e.topic == topic and e.reply_to is not None]
        story = [(type(e).__name__, ids.index(m) if (m := getattr(e, "reply_to", None) or getattr(e, "request_id", None)
                                                     or getattr(e, "id", None)) in ids else m,
                  getattr(e, "node_id", None)) for e in events if getattr(e, "topic", None) == topic]
        assert [r.reply_to for r in replies] == ids, (topic, story)
        assert [r.id for r in replies] == [reply_id_for(topic, m) for m in ids]
        done = [e for e in events if isinstance(e, GenerationCompleted) and e.topic == topic]
        assert [d.request_id for d in done] == ids, topic
        failed = [e for e in events if isinstance(e, GenerationFailed) and e.topic == topic]
        assert not failed, failed
        nodes[topic] = [d.node_id for d in done]  # type: ignore[misc]
    return nodes


async def wait_completed(sub, want: int, timeout: float) -> list[GenerationCompleted]:
    done: list[GenerationCompleted] = []
    with anyio.fail_after(timeout):
        while len(done) < want:
            event = decode_topic_event((await sub.next_msg(timeout=timeout)).data)
            assert not isinstance(event, GenerationFailed), event
            if isinstance(event, GenerationCompleted):
                done.append(event)
    return done


# -- 200 messages over 20 topics, two nodes ---------------------------------------------------------------


async def test_two_nodes_answer_each_message_once_in_order_one_node_per_topic(cluster, nc, tmp_path):
    js = nc.jetstream()
    # 200 messages of one author at once: its per-author quotas (issue 20.4) are off, as this is about the nodes.
    no_quotas = {"quota_messages_per_minute": 0, "quota_running_per_author": 0}
    async with node(node_settings(cluster, 1, "a", tmp_path, **no_quotas)) as a, \
            node(node_settings(cluster, 2, "b", tmp_path, **no_quotas)) as b:
        assert a.registry is not None and b.registry is not None
        await wait_owned_by(nc, {"a", "b"})
        info = await js.stream_info(S.stream_name)
        assert info.config.num_replicas == 3  # min(3, cluster size)
        topics = [f"room-{i}" for i in range(20)]
        sent: dict[str, list[str]] = defaultdict(list)
        sub = await nc.subscribe(S.all_evt)
        await nc.flush()
        for i in range(10):
            for topic in topics:
                message = chat(topic, f"Say the number {i}.")
                sent[topic].append(message.id)
                await post(js, message)
        await wait_completed(sub, 200, timeout=900)
        await sub.unsubscribe()
        nodes = check_exactly_once(await topic_log(js), sent)
        # One node per topic, the one that owns its partition; both nodes did their share.
        for topic, answered_by in nodes.items():
            assert set(answered_by) == {wanted_owner(partition_of(topic, PARTITIONS), {"a", "b"})}, topic
        assert {n for ns in nodes.values() for n in ns} == {"a", "b"}
        # Diagnostics name the node and its partitions.
        assert a.assistant is not None and a.assistant.stats()["node_id"] == "a"
        assert a.intake is not None and b.intake is not None
        diag_a, diag_b = a.intake.node_diagnostics(), b.intake.node_diagnostics()  # type: ignore[attr-defined]
        assert sorted(diag_a["partitions"] + diag_b["partitions"]) == list(range(PARTITIONS))
        assert diag_a["members"] == ["a", "b"] and diag_a["nodeId"] == "a"
        service = (await b.diagnostics()).assistant
        assert service is not None and service["node_id"] == "b" and service["node"] == diag_b


# -- a node SIGKILLed mid-generation ----------------------------------------------------------------------


def _config(path: Path, node_id: str, **extra: object) -> Path:
    lines = ["[lamabus]", f'node_id = "{node_id}"', 'registry = "nats"', f"ack_wait = {ACK_WAIT}", 'web = "off"',
             'metrics = "off"', 'log_level = "info"', *(f"{k} = {json.dumps(v)}" for k, v in extra.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_a_killed_node_s_topics_are_answered_by_another_once(cluster, nc, tmp_path):
    js = nc.jetstream()
    procs = {
        "a": ServeProcess(",".join(cluster.urls_from(1)), tmp_path / "a", _config(tmp_path / "a.toml", "a"),
                          strict=True),
        "b": ServeProcess(",".join(cluster.urls_from(2)), tmp_path / "b", _config(tmp_path / "b.toml", "b"),
                          strict=True),
    }
    try:
        for proc in procs.values():
            await proc.start()
        await wait_owned_by(nc, {"a", "b"})
        (victim_topic,) = topics_of("a", {"a", "b"}, 1, "kill")
        (other_topic,) = topics_of("b", {"a", "b"}, 1, "keep")
        first = chat(victim_topic, COUNTING, LONG)
        queued = [chat(victim_topic, f"Say the number {i}.") for i in range(3)]
        others = [chat(other_topic, f"Say the number {i}.") for i in range(2)]
        tokens = await nc.subscribe(S.tok(victim_topic))
        await nc.flush()
        await post(js, first)
        for m in [*queued, *others]:
            await post(js, m)
        with anyio.fail_after(120):
            while True:
                token = decode_topic_event((await tokens.next_msg(timeout=120)).data)
                if isinstance(token, GenerationToken) and token.request_id == first.id:
                    break
        await procs["a"].kill()  # mid-generation: node a answered nothing of `first` yet
        killed, killed_at = time.monotonic(), datetime.now()
        taken_over = None
        with anyio.fail_after(120):
            while True:  # the first token of `first` again, now from node b
                token = decode_topic_event((await tokens.next_msg(timeout=120)).data)
                if isinstance(token, GenerationToken) and token.request_id == first.id and token.seq == 0:
                    taken_over = time.monotonic() - killed
                    break
        await tokens.unsubscribe()
        sent = {victim_topic: [first.id, *(m.id for m in queued)], other_topic: [m.id for m in others]}
        with anyio.fail_after(180):
            while True:
                log = await topic_log(js)
                done = {e.request_id for _, e in log if isinstance(e, GenerationCompleted)}
                if all(mid in done for ids in sent.values() for mid in ids):
                    break
                await anyio.sleep(0.5)  # polling the stream, with a deadline
        nodes = check_exactly_once(log, sent)
        assert nodes[victim_topic] == ["b"] * 4  # everything of the dead node's topic, answered by b
        assert nodes[other_topic] == ["b", "b"]
        started = [e for _, e in log if isinstance(e, GenerationStarted) and e.request_id == first.id]
        assert [s.node_id for s in started] == ["a"]  # b's started for it is the same event id: dropped
        await wait_owned_by(nc, {"b"}, timeout=30)
        took = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") for line in procs["b"].lines
                if "owns partition" in line]
        leases = (max(took) - killed_at).total_seconds()
        print(f"\nfailover: kill -> leases taken by the other node {leases:.2f}s, "
              f"-> first token of the interrupted message there {taken_over:.2f}s")
        assert taken_over is not None and taken_over < Settings().lease_ttl + 10
        assert await procs["b"].stop() == 0, procs["b"].log_tail()
    finally:
        for proc in procs.values():
            await proc.aclose()


# -- a nats-server killed ------------------------------------------------------------------------------


async def test_a_killed_nats_server_loses_nothing(cluster, nc, tmp_path):
    js = nc.jetstream()
    async with node(node_settings(cluster, 1, "a", tmp_path)), node(node_settings(cluster, 2, "b", tmp_path)):
        await wait_owned_by(nc, {"a", "b"})
        topics = [*topics_of("a", {"a", "b"}, 2, "ka"), *topics_of("b", {"a", "b"}, 2, "kb")]
        sent: dict[str, list[str]] = defaultdict(list)
        tokens = await nc.subscribe(f"{S.prefix}.topic.*.tok")
        await nc.flush()
        for topic in topics:
            message = chat(topic, COUNTING, MEDIUM)
            sent[topic].append(message.id)
            await post(js, message)
        await tokens.next_msg(timeout=120)  # generating
        await tokens.unsubscribe()
        await cluster.kill(1)  # node a's server: a fails over to another, streams keep two of three copies
        for i in range(2):
            for topic in topics:
                message = chat(topic, f"Say the number {i}.")
                sent[topic].append(message.id)
                await post(js, message)
        want = {mid for ids in sent.values() for mid in ids}
        with anyio.fail_after(600):
            while True:
                log = await topic_log(js)
                if want <= {e.request_id for _, e in log if isinstance(e, GenerationCompleted)}:
                    break
                await anyio.sleep(0.5)  # polling the stream, with a deadline
        check_exactly_once(log, sent)


# -- the registry is shared ------------------------------------------------------------------------------


async def test_a_model_imported_through_one_node_is_listed_and_used_by_the_other(cluster, nc, tmp_path, model_path):
    js = nc.jetstream()
    extra = {"bundled_model": False, "model_dirs": [str(model_path.parent)]}
    async with node(node_settings(cluster, 1, "a", tmp_path, **extra)) as a, \
            node(node_settings(cluster, 2, "b", tmp_path, **extra)) as b:
        assert a.registry is not None and b.registry is not None
        imported = await a.registry.import_model(model_path, "shared")
        await a.registry.activate(imported.id)
        assert [m.id for m in await b.registry.list_models()] == [imported.id]
        await wait_owned_by(nc, {"a", "b"})
        (topic,) = topics_of("b", {"a", "b"}, 1, "shared")
        sub = await nc.subscribe(S.evt(topic))
        await nc.flush()
        message = chat(topic, "Say hello.")
        await post(js, message)
        (done,) = await wait_completed(sub, 1, timeout=120)
        assert (done.request_id, done.model_id, done.node_id) == (message.id, imported.id, "b")


async def test_two_nodes_racing_one_registry_command_one_conflict(cluster, nc, tmp_path):
    async with node(node_settings(cluster, 1, "a", tmp_path)) as a, node(node_settings(cluster, 2, "b", tmp_path)) as b:
        assert a.registry is not None and b.registry is not None
        outcomes: list[object] = []

        async def create(registry) -> None:
            try:
                outcomes.append(await registry.create_topic("race", name="race"))
            except LamaError as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(create, a.registry)
            tg.start_soon(create, b.registry)
        errors = [o for o in outcomes if isinstance(o, LamaError)]
        assert len(errors) == 1 and errors[0].code is ErrorCode.CONFLICT, outcomes
        assert (await a.registry.get_topic("race")).id == (await b.registry.get_topic("race")).id == "race"
