"""A burst is queued by the broker, not refused (issue 16): 1,000 messages over 50 topics,
posted at once, all answered, in posting order per topic, none ``busy``."""

from __future__ import annotations

import collections
import time
import uuid
from datetime import datetime, timezone

import anyio
import pytest

from bus.node.app import LamabusService
from bus.client import LamabusClient
from bus.config import Settings
from bus.node.intake import CONSUMER
from tests.conftest import entered_in_own_task
from wire.messages import ChatMessage, GenerationCompleted, GenerationFailed, decode_topic_event
from wire.params import GenerationParams

pytestmark = [pytest.mark.model, pytest.mark.slow]

ONE_TOKEN = GenerationParams(max_tokens=1, temperature=0.0)


async def test_a_burst_of_1000_over_50_topics_is_answered_in_order(tmp_path, nats_url):
    # Each topic's history stays short, so 1,000 prompts cost what 1,000 short questions cost:
    # this is about the intake, not about prefill.
    # One author stands for the crowd here: its per-author quotas (issue 20.4) are off, as this is about the intake.
    settings = Settings(nats_url=nats_url, data_dir=str(tmp_path / "data"), history_cache_turns=2,
                        quota_messages_per_minute=0, quota_running_per_author=0)
    async with entered_in_own_task(LamabusService(settings)) as service, \
            LamabusClient.connect(service.url, prefix=settings.prefix) as client:
        await _burst(service, client)


async def _burst(service, client) -> None:
    topics = [f"burst-{i}" for i in range(50)]
    posted: dict[str, list[str]] = collections.defaultdict(list)
    answered: dict[str, list[str]] = collections.defaultdict(list)
    failed: list[GenerationFailed] = []
    done = anyio.Event()
    total = 1000

    async def on_evt(msg) -> None:
        event = decode_topic_event(msg.data)
        if isinstance(event, GenerationCompleted):
            answered[event.topic].append(event.request_id)
        elif isinstance(event, GenerationFailed):
            failed.append(event)
        if sum(map(len, answered.values())) + len(failed) >= total:
            done.set()

    await client.nc.subscribe(f"{service.settings.prefix}.topic.*.evt", cb=on_evt)
    await client.nc.flush()
    started = time.perf_counter()
    for n in range(total):
        topic = topics[n % len(topics)]
        message = ChatMessage(id=str(uuid.uuid4()), topic=topic, author_id="crowd", text=f"Say {n}.",
                              sent_at=datetime.now(timezone.utc), params=ONE_TOKEN)
        posted[topic].append(message.id)
        await client.post(message)
    # The intake holds at most its window; the rest waits, durable, in the stream.
    info = await client.js.consumer_info(service.subjects.stream_name, CONSUMER)
    assert info.num_ack_pending <= service.settings.intake_window
    with anyio.move_on_after(1200):
        await done.wait()
    assert done.is_set(), (sum(map(len, answered.values())), len(failed), service.intake.in_flight, service.intake.taken,
                           service.assistant.stats())
    elapsed = time.perf_counter() - started
    assert failed == [], collections.Counter(f.error.code for f in failed)
    assert {t: answered[t] for t in topics} == {t: posted[t] for t in topics}  # all, once, in order
    print(f"\n{total} messages over {len(topics)} topics: {total / elapsed:.1f} msg/s")
