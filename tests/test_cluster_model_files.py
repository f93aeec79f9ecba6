"""A node that lacks a registered model's file takes no topics while another node has them all (issue 11,
"does not take the topic's messages it cannot answer"), on a real 3-server NATS cluster."""

from __future__ import annotations

import contextlib

import pytest

from bus.node.cluster import owners_among
from tests.conftest import entered_in_own_task
from tests.test_cluster_nodes import (  # noqa: F401  (fixtures)
    PARTITIONS,
    S,
    chat,
    cluster,
    nc,
    node,
    node_settings,
    post,
    topics_of,
    wait_completed,
    wait_owned_by,
)


def test_owners_are_the_nodes_with_every_file_or_all_when_none_has_them():
    assert owners_among({"a", "b", "c"}, {"b"}) == {"a", "c"}
    assert owners_among({"a", "b"}, {"a", "b"}) == {"a", "b"}  # nobody can: all answer model_file_missing
    assert owners_among({"a"}, set()) == {"a"}


@contextlib.asynccontextmanager
async def node_lacking_files(settings, lacks: list[bool]):
    """A node whose model files are present when ``lacks[0]`` is false (the test flips it)."""
    from bus.node.app import LamabusService

    class Node(LamabusService):
        def _has_model_files(self) -> bool:
            return not lacks[0]

    async with entered_in_own_task(Node(settings)) as svc:
        yield svc


@pytest.mark.slow
@pytest.mark.model
async def test_a_node_without_a_model_file_takes_no_topics_until_it_has_it(cluster, nc, tmp_path):
    lacks = [True]
    async with node(node_settings(cluster, 1, "a", tmp_path)) as a, \
            node_lacking_files(node_settings(cluster, 2, "b", tmp_path), lacks) as b:
        await wait_owned_by(nc, {"a"})  # b is live, and owns nothing
        assert b.intake.owned == [] and b.intake.node_diagnostics()["lackingModelFiles"] == ["b"]
        assert sorted(a.intake.members) == ["a"]  # type: ignore[union-attr]
        # A topic b would own if it had the files: answered by a.
        (topic,) = topics_of("b", {"a", "b"}, 1, "files")
        sub = await nc.subscribe(S.evt(topic))
        await nc.flush()
        message = chat(topic, "Say hello.")
        await post(nc.jetstream(), message)
        (done,) = await wait_completed(sub, 1, timeout=120)
        assert (done.request_id, done.node_id) == (message.id, "a")
        lacks[0] = False  # the file arrived (a shared volume mounted, or `models pull` on b)
        await wait_owned_by(nc, {"a", "b"})
        assert b.intake.owned and len(a.intake.owned) + len(b.intake.owned) == PARTITIONS  # type: ignore[union-attr]
        assert b.intake.node_diagnostics()["lackingModelFiles"] == []
