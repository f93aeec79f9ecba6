"""A topic's replies stay in order when publishing one of them fails (bus/node/lane_order.py).

The assistant runs on in-memory ports; the broker is a fake that hands a message back and
delivers it again a moment later, as JetStream does after a NAK. The leader election is a
publisher that refuses one reply until that reply's message has been handed back.
"""

from __future__ import annotations

import anyio
import pytest

from bus.node.lane_order import LaneHeld, LaneOrder, OrderedDirectory, RetryingPublisher
from handlers.assistant import Assistant, AssistantSettings, reply_id_for
from tests.test_assistant_unit import FakeDirectory, FakePublisher, FakeRuntime, msg
from tests.test_cluster_nodes import cluster, nc  # noqa: F401  (fixtures of the cluster test below)


class Election(FakePublisher):
    """Refuses to publish the reply to ``message_id`` until told the election is over."""

    def __init__(self, message_id: str, topic: str = "t1") -> None:
        super().__init__()
        self.refused_id = reply_id_for(topic, message_id)
        self.over = False
        self.refusals = 0

    async def message(self, message):
        if message.id == self.refused_id and not self.over:
            self.refusals += 1
            raise ConnectionError("no JetStream leader (election under way)")
        await super().message(message)


class Broker:
    """Delivers messages to ``submit``; a message handed back is delivered again shortly after."""

    def __init__(self, tg, on_hand_back=lambda message: None) -> None:
        self.tg = tg
        self.submit = None
        self.on_hand_back = on_hand_back
        self.acked: list[str] = []
        self.handed_back: list[str] = []

    async def deliver(self, message, redelivered: bool = False) -> None:
        await self.submit(message, _Delivery(self, message, redelivered))

    async def _again(self, message) -> None:
        await anyio.sleep(0.05)
        await self.deliver(message, redelivered=True)


class _Delivery:
    def __init__(self, broker: Broker, message, redelivered: bool) -> None:
        self.broker, self.message, self.redelivered = broker, message, redelivered

    async def ack(self) -> None:
        self.broker.acked.append(self.message.id)

    async def in_progress(self) -> None:
        pass

    async def retry_later(self) -> None:
        self.broker.handed_back.append(self.message.id)
        self.broker.on_hand_back(self.message)
        self.broker.tg.start_soon(self.broker._again, self.message)


def _first_replies(publisher: FakePublisher) -> list[str]:
    seen: list[str] = []
    for m in publisher.messages:
        if m.reply_to not in seen:
            seen.append(m.reply_to)
    return seen


async def _run(ordered: bool) -> tuple[list[str], Broker, Election, LaneOrder, int]:
    directory, runtime = FakeDirectory(), FakeRuntime()
    election = Election("m1")
    order = LaneOrder()
    publisher = RetryingPublisher(election, budget=0.2, first_delay=0.02) if ordered else election
    ports = OrderedDirectory(directory, order) if ordered else directory
    messages = [msg("m1", "one two"), msg("m2", "three four"), msg("m3", "five six")]
    async with anyio.create_task_group() as tg:
        def election_over(message) -> None:
            if message.id == "m1":
                election.over = True  # the message came back after the election: its reply goes out now
        broker = Broker(tg, election_over)
        async with Assistant(ports, runtime, publisher, AssistantSettings(progress_interval=0.05)) as assistant:
            broker.submit = order.submit(assistant.submit) if ordered else assistant.submit
            for m in messages:
                await broker.deliver(m)
            with anyio.fail_after(10):
                while len(set(broker.acked) & {"m1", "m2", "m3"}) < 3:
                    await anyio.sleep(0.01)
            errors = assistant.counters["errors"]
        tg.cancel_scope.cancel()
    return _first_replies(election), broker, election, order, errors


async def test_a_reply_handed_back_is_not_overtaken_by_the_next_in_its_topic():
    replies, broker, election, order, errors = await _run(ordered=True)
    assert election.refusals >= 2  # retried before it was handed back
    assert broker.handed_back[0] == "m1"
    assert replies == ["m1", "m2", "m3"]
    assert order.held() == {}  # the hold ended with m1's ack
    assert order.held_back >= 1  # m2 waited for it
    assert errors == 1  # m1's failed publish; m2 waiting its turn is not an error


async def test_without_the_lane_order_the_next_reply_overtakes():
    # The same run on the bare ports: this is the failure the lane order prevents.
    replies, broker, _, _, _ = await _run(ordered=False)
    assert broker.handed_back == ["m1"]
    assert replies != ["m1", "m2", "m3"] and sorted(replies) == ["m1", "m2", "m3"]


async def test_a_short_election_is_ridden_out_by_the_retry_without_handing_back():
    election = Election("m1")
    publisher = RetryingPublisher(election, budget=5.0, first_delay=0.01)

    async def end_election() -> None:
        while election.refusals < 3:
            await anyio.sleep(0.005)
        election.over = True

    reply = msg(reply_id_for("t1", "m1"), "x", reply_to="m1")
    async with anyio.create_task_group() as tg:
        tg.start_soon(end_election)
        with anyio.fail_after(5):
            await publisher.message(reply)
    assert election.refusals == 3 and publisher.retries == 3
    assert [m.id for m in election.messages] == [reply.id]


async def test_the_retry_gives_up_within_its_budget():
    election = Election("m1")
    publisher = RetryingPublisher(election, budget=0.3, first_delay=0.05)
    reply = msg(reply_id_for("t1", "m1"), "x", reply_to="m1")
    started = anyio.current_time()
    with pytest.raises(ConnectionError):
        await publisher.message(reply)
    assert 0.25 <= anyio.current_time() - started < 1.0
    assert election.refusals >= 3


def test_a_hold_ends_when_its_message_is_settled_or_the_topic_leaves_or_it_is_too_old():
    order = LaneOrder(max_hold=60)
    order.handed_back("t1", "m1")
    order.handed_back("t1", "m2")  # the first one handed back is the one the topic waits for
    with pytest.raises(LaneHeld):
        order.check("t1", "m2")
    order.check("t1", "m1")  # the one waited for passes
    order.check("t2", "x")  # other topics do not wait
    order.settled("t1", "m2")  # not the one waited for: no change
    with pytest.raises(LaneHeld):
        order.check("t1", "m2")
    order.settled("t1", "m1")
    order.check("t1", "m2")
    order.handed_back("t1", "m1")
    order.release(keep=lambda topic: topic != "t1")  # this node gave the topic's partition away
    assert order.held() == {}
    order = LaneOrder(max_hold=0.0)
    order.handed_back("t1", "m1")
    order.check("t1", "m2")  # a hold too old to keep
    assert order.held() == {}


# -- on a real 3-server cluster: the broker's own hand-back and redelivery ---------------------------------


class _RefusingUntilHandedBack:
    """The node's NATS publisher, refusing the reply to one message until the node has handed it back."""

    def __init__(self, inner, order: LaneOrder, topic: str, message_id: str) -> None:
        self.inner, self.order, self.topic = inner, order, topic
        self.refused_id = reply_id_for(topic, message_id)
        self.message_id = message_id
        self.refusals = 0

    async def token(self, token):
        await self.inner.token(token)

    async def event(self, event, *, dedup_id, wait=True):
        await self.inner.event(event, dedup_id=dedup_id, wait=wait)

    async def message(self, message):
        if message.id == self.refused_id and self.order.held().get(self.topic) != self.message_id:
            self.refusals += 1
            raise ConnectionError("no JetStream leader (election under way)")
        await self.inner.message(message)


@pytest.mark.slow
@pytest.mark.model
async def test_on_a_cluster_a_reply_handed_back_keeps_its_place(cluster, nc, tmp_path):
    from tests.test_cluster_nodes import QUICK, chat, check_exactly_once, node, node_settings, post, topic_log

    js = nc.jetstream()
    async with node(node_settings(cluster, 1, "a", tmp_path)) as a:
        assert a.assistant is not None and a.lane_order is not None
        topic = "election"
        sent = [chat(topic, f"Say the number {i}.", QUICK) for i in range(3)]
        retrying = a.assistant.publisher
        assert isinstance(retrying, RetryingPublisher)
        refusing = retrying.inner = _RefusingUntilHandedBack(retrying.inner, a.lane_order, topic, sent[0].id)
        for m in sent:
            await post(js, m)
        with anyio.fail_after(120):
            while True:
                log = await topic_log(js)
                replied = {e.reply_to for _, e in log if getattr(e, "reply_to", None)}
                if all(m.id in replied for m in sent) and not a.assistant.stats()["lanes"]:
                    break
                await anyio.sleep(0.2)  # polling the stream, with a deadline
        assert refusals_exceeded_the_retry(refusing, retrying)
        assert a.lane_order.held_back >= 1  # a later message waited for the one handed back
        assert a.lane_order.held() == {}
        check_exactly_once(log, {topic: [m.id for m in sent]})  # once each, replies in posting order


def refusals_exceeded_the_retry(refusing: _RefusingUntilHandedBack, retrying: RetryingPublisher) -> bool:
    return refusing.refusals >= 2 and retrying.retries >= 1
