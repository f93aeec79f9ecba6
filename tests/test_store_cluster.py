"""The JetStream event store on a real 3-server cluster (R3): shared log across servers, survives a SIGKILLed server."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import nats
import pytest

from domain.events import ModelUsed, TopicCreated
from domain.mapper import Keyed, to_new_event
from storage.jetstream import JetStreamEventStore
from storage.store import NO_STREAM
from bench.nats_cluster import NatsCluster
from wire.errors import ErrorCode, LamaError

pytestmark = pytest.mark.slow


@pytest.fixture
async def cluster(tmp_path: Path):
    async with NatsCluster(tmp_path / "cluster", size=3) as c:
        yield c


async def connect(cluster: NatsCluster, first: int):
    # Fast reconnects: the test kills servers and wants the survivors used at once.
    return await nats.connect(servers=cluster.urls_from(first), dont_randomize=True, reconnect_time_wait=0.1,
                              max_reconnect_attempts=-1, connect_timeout=2)


async def stream_leader(nc, stream: str) -> str:
    with anyio.fail_after(30):
        while True:
            info = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)).data)
            if leader := info.get("cluster", {}).get("leader"):
                return str(leader)
            await anyio.sleep(0.1)  # no leader elected yet; ask again


@pytest.mark.parametrize("victim", ["stream-leader", "writer-server"])
async def test_replicated_store_shares_the_log_and_survives_a_killed_server(cluster: NatsCluster, victim: str):
    writer_nc, reader_nc = await connect(cluster, 1), await connect(cluster, 2)
    try:
        async with JetStreamEventStore(writer_nc, replicas=3) as writer, \
                JetStreamEventStore(reader_nc, replicas=3) as reader:
            info = json.loads((await writer_nc.request(f"$JS.API.STREAM.INFO.{writer.stream}", b"", timeout=5)).data)
            assert info["config"]["num_replicas"] == 3
            assert len(info["cluster"]["replicas"]) == 2  # and the leader: three copies

            committed: dict[str, int] = {}  # event id -> position the store said it got

            async def append(stream_id: str, event_id: str, expected: int | None) -> None:
                event = to_new_event(Keyed(ModelUsed(at=len(committed)), event_id))
                result = await writer.append(stream_id, [event], expected)
                committed[event_id] = result.positions[0]

            # The reader, on another server, follows the writer's commits as they happen.
            seen: list[str] = []
            goal, wanted = 5, anyio.Event()

            async def follower() -> None:
                async for ev in reader.follow():
                    seen.append(ev.event_id)
                    if len(seen) >= goal:
                        wanted.set()

            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(follower)
                    for i in range(5):
                        await append("model-a", f"before-{i}", i)
                    await wanted.wait()
                    assert seen == [f"before-{i}" for i in range(5)]

                    # A racing write from the reader's side loses on the expected version, and costs no position.
                    with pytest.raises(LamaError) as exc:
                        await reader.append("model-a", [to_new_event(TopicCreated(at=0))], 4)
                    assert exc.value.code is ErrorCode.CONFLICT

                    # The stream's leader: a new one must be elected from the survivors. The writer's own server:
                    # its connection fails over to another, the append in flight is retried without duplicating.
                    if victim == "stream-leader":
                        leader = await stream_leader(writer_nc, writer.stream)
                        await cluster.kill(next(n.index for n in cluster.nodes if n.name == leader))
                    else:
                        await cluster.kill(1)

                    goal, wanted = 11, anyio.Event()
                    for i in range(5):
                        await append("model-a", f"after-{i}", 5 + i)
                    await append("topic-t", "topic", NO_STREAM)
                    await wanted.wait()
                    tg.cancel_scope.cancel()

            expected_ids = [f"before-{i}" for i in range(5)] + [f"after-{i}" for i in range(5)] + ["topic"]
            assert seen == expected_ids
            for store in (writer, reader):
                log = await store.read_all()
                # Nothing committed is lost, and positions stay 1, 2, 3, ... across the failover.
                assert [e.event_id for e in log] == expected_ids
                assert [e.position for e in log] == list(range(1, len(expected_ids) + 1))
                assert {e.event_id: e.position for e in log} == committed
                assert [e.version for e in await store.read_stream("model-a")] == list(range(1, 11))
    finally:
        await writer_nc.close()
        await reader_nc.close()


async def test_a_store_opened_after_the_writes_reads_them_from_any_server(cluster: NatsCluster):
    for first in (1, 2, 3):
        nc = await connect(cluster, first)
        try:
            async with JetStreamEventStore(nc, replicas=3) as store:
                assert await store.last_position() == first - 1
                await store.append(f"model-{first}", [to_new_event(ModelUsed(at=first))], NO_STREAM)
                assert [e.stream_id for e in await store.read_all()] == [f"model-{i}" for i in range(1, first + 1)]
        finally:
            await nc.close()
