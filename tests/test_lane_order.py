"""A topic's replies stay in order when publishing one of them fails (bus/lane_order.py).

The assistant runs on in-memory ports; the broker is a fake that hands a message back and
delivers it again a moment later, as JetStream does after a NAK. The leader election is a
publisher that refuses one reply until that reply's message has been handed back.
"""

from __future__ import annotations

import anyio
import pytest

from bus.lane_order import LaneHeld, LaneOrder, OrderedDirectory, RetryingPublisher
from handlers.assistant import Assistant, AssistantSettings, reply_id_for
from tests.test_assistant_unit import FakeDirectory, FakePublisher, FakeRuntime, msg


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


async def _run(ordered: bool) -> tuple[list[str], Broker, Election, LaneOrder]:
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
            broker.submit = order.submit(assistant.submit, ports) if ordered else assistant.submit
            for m in messages:
                await broker.deliver(m)
            with anyio.fail_after(10):
                while len(set(broker.acked) & {"m1", "m2", "m3"}) < 3:
                    await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    return _first_replies(election), broker, election, order


async def test_a_reply_handed_back_is_not_overtaken_by_the_next_in_its_topic():
    replies, broker, election, order = await _run(ordered=True)
    assert election.refusals >= 2  # retried before it was handed back
    assert broker.handed_back[0] == "m1"
    assert replies == ["m1", "m2", "m3"]
    assert order.held() == {}  # the hold ended with m1's ack
    assert order.held_back >= 1  # m2 waited for it


async def test_without_the_lane_order_the_next_reply_overtakes():
    # The same run on the bare ports: this is the failure the lane order prevents.
    replies, broker, _, _ = await _run(ordered=False)
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


def test_a_hold_ends_when_its_message_is_answered_elsewhere_or_the_topic_leaves_or_it_is_too_old():
    order = LaneOrder(max_hold=60)
    order.handed_back("t1", "m1")
    order.handed_back("t1", "m2")  # the first one handed back is the one the topic waits for
    with pytest.raises(LaneHeld):
        order.check("t1", "m2", answered=lambda _: False)
    order.check("t1", "m1", answered=lambda _: False)  # the one waited for passes
    order.check("t2", "x", answered=lambda _: False)  # other topics do not wait
    order.check("t1", "m2", answered=lambda mid: mid == "m1")  # answered by another node: the hold ends
    assert order.held() == {}
    order.handed_back("t1", "m1")
    order.release(keep=lambda topic: topic != "t1")  # this node gave the topic's partition away
    assert order.held() == {}
    order = LaneOrder(max_hold=0.0)
    order.handed_back("t1", "m1")
    order.check("t1", "m2", answered=lambda _: False)  # a hold too old to keep
    assert order.held() == {}
