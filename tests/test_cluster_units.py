"""The pieces of bus/node/cluster.py that need no cluster: the partition function against the broker's own
transform, rendezvous hashing, node ids and the cluster settings."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import nats

from bus.node.cluster import partition_of, wanted_owner
from bus.config import load_settings


async def test_partition_of_is_the_brokers_subject_transform(nats_url: str):
    nc = await nats.connect(nats_url)
    try:
        body = {"name": "PT", "retention": "limits", "storage": "memory", "num_replicas": 1,
                "subjects": ["pt.topic.*.msg"],
                "subject_transform": {"src": "pt.topic.*.msg", "dest": "pt.part.{{partition(12,1)}}.{{wildcard(1)}}"}}
        created = json.loads((await nc.request("$JS.API.STREAM.CREATE.PT", json.dumps(body).encode(), timeout=5)).data)
        assert created.get("error") is None, created
        topics = ["a", "b", "room-1", "x_y", "Ünïcode-not-valid-but-hashed", "t" * 128, *[f"t{i}" for i in range(40)]]
        js = nc.jetstream()
        for topic in topics:
            await js.publish(f"pt.topic.{topic}.msg", b"x")  # acknowledged: stored when it returns
        info = json.loads((await nc.request("$JS.API.STREAM.INFO.PT", json.dumps({"subjects_filter": ">"}).encode(),
                                            timeout=5)).data)
        stored = {s.split(".", 3)[3]: int(s.split(".")[2]) for s in info["state"]["subjects"]}
        assert stored == {t: partition_of(t, 12) for t in topics}
    finally:
        await nc.close()


def test_rendezvous_moves_only_what_a_new_node_takes():
    two = {p: wanted_owner(p, {"a", "b"}) for p in range(64)}
    three = {p: wanted_owner(p, {"a", "b", "c"}) for p in range(64)}
    moved = {p for p in range(64) if two[p] != three[p]}
    assert moved and all(three[p] == "c" for p in moved)  # the others keep theirs (and their KV caches)
    assert 10 <= len(moved) <= 35  # about a third
    assert {wanted_owner(p, ["b", "a"]) for p in range(64)} == {"a", "b"}
    assert all(wanted_owner(p, ["b", "a"]) == two[p] for p in range(64))  # order of the members is irrelevant


def test_cluster_settings_from_flags_and_environment(tmp_path: Path):
    s = load_settings(environ={"LAMABUS_REGISTRY": "nats", "LAMABUS_NODE_ID": "n-1", "LAMABUS_REPLICAS": "3"})
    assert (s.registry, s.node_name, s.replicas) == ("nats", "n-1", 3)
    s = load_settings({"registry": "sqlite", "data_dir": str(tmp_path)}, environ={"LAMABUS_REGISTRY": "nats"})
    assert s.registry == "sqlite" and s.replicas is None
    # The default node id: stable for one data dir, different for another.
    again = load_settings({"data_dir": str(tmp_path)}, environ={})
    other = load_settings({"data_dir": str(tmp_path / "other")}, environ={})
    assert s.node_name == again.node_name != other.node_name
    from wire.errors import LamaError

    for bad in ({"node_id": "a.b"}, {"registry": "postgres"}, {"replicas": 0}):
        try:
            load_settings(bad, environ={})
        except LamaError:
            continue
        raise AssertionError(f"accepted {bad}")


# -- the assistant as one node of several ---------------------------------------------------------------


async def test_every_generation_event_names_the_node(tmp_path: Path):
    from handlers.assistant import Assistant, AssistantSettings
    from tests.test_assistant_unit import FakeDelivery, FakeDirectory, FakePublisher, FakeRuntime, msg
    from wire.messages import GenerationCompleted, GenerationStarted, encode

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    directory, runtime, pub = FakeDirectory(), FakeRuntime(), FakePublisher()
    directory.resolve_model = _model_at(str(model))  # type: ignore[method-assign]
    async with Assistant(directory, runtime, pub, AssistantSettings(node_id="n7")) as assistant:
        d = FakeDelivery()
        await assistant.submit(msg("a", "one two"), d)
        await d.acked.wait()
        assert assistant.stats()["node_id"] == "n7"
    started, completed = pub.events
    assert isinstance(started, GenerationStarted) and isinstance(completed, GenerationCompleted)
    assert started.node_id == completed.node_id == "n7"
    assert b'"nodeId":"n7"' in encode(completed)


async def test_a_node_without_the_model_file_says_so_and_takes_nothing(tmp_path: Path):
    from handlers.assistant import Assistant, AssistantSettings
    from tests.test_assistant_unit import FakeDelivery, FakeDirectory, FakePublisher, FakeRuntime, msg
    from wire.errors import ErrorCode
    from wire.messages import GenerationFailed

    directory, runtime, pub = FakeDirectory(), FakeRuntime(), FakePublisher()
    directory.resolve_model = _model_at(str(tmp_path / "elsewhere.gguf"))  # type: ignore[method-assign]
    async with Assistant(directory, runtime, pub, AssistantSettings(node_id="n2")) as assistant:
        d = FakeDelivery()
        await assistant.submit(msg("a"), d)
        assert d.acked.is_set()  # settled: not redelivered forever
    (failed,) = pub.events
    assert isinstance(failed, GenerationFailed) and failed.node_id == "n2"
    assert failed.error.code is ErrorCode.MODEL_FILE_MISSING and "n2" in failed.error.message
    assert runtime.requests == []  # nothing queued, nothing generated


async def test_a_late_node_publishes_the_reply_recorded_first_not_its_own():
    """Two nodes answered the same message (one took the topic over while the other was slow); the registry
    kept the first record, and the late node publishes that one under the shared id."""
    from handlers.assistant import Assistant, AssistantSettings
    from handlers.ports import RecordedReply
    from tests.test_assistant_unit import FakeDelivery, FakeDirectory, FakePublisher, FakeRuntime, msg

    class FirstRecordWins(FakeDirectory):
        async def record_reply(self, message, reply, completed):
            if (message.topic, message.id) not in self.replies:  # the other node's record, already there
                other = msgspec.structs.replace(reply, text="the other node's answer")
                self.replies[(message.topic, message.id)] = RecordedReply(
                    other, msgspec.structs.replace(completed, text=other.text, node_id="n1"))

    directory, runtime, pub = FirstRecordWins(), FakeRuntime(), FakePublisher()
    async with Assistant(directory, runtime, pub, AssistantSettings()) as assistant:
        d = FakeDelivery()
        await assistant.submit(msg("a", "my answer"), d)
        await d.acked.wait()
    (reply,) = pub.messages
    assert reply.text == "the other node's answer"
    assert pub.events[-1].text == "the other node's answer" and pub.events[-1].node_id == "n1"


def _model_at(path: str):
    from engine.types import ModelConfig
    from handlers.ports import ModelRef
    from tests.test_assistant_unit import AI

    async def resolve_model(topic, requested):
        return ModelRef(model_id="m1", person_id=AI, config=ModelConfig(model_path=path))

    return resolve_model
