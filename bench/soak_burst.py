"""The soak's fourth part (bench/soak.py): a burst of one-token messages over many topics at
once; answered, lost, duplicated, out of order, refused, messages/s."""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import statistics
import time
from typing import Any

from bench.soak_rig import ONE_TOKEN, PREFIX, S, Rig, chat, counter, exactly_once, timing_figures
from bus.node.intake import CONSUMER
from bus.node.publisher import MSG_ID
from wire.errors import LamaError
from wire.messages import (
    ChatMessage,
    GenerationCompleted,
    GenerationFailed,
    MessageRejected,
    decode_topic_event,
    encode,
)


def _out_of_order(order: list[str], posted: list[str]) -> int:
    """Messages answered out of posting order: how many fall outside the longest in-order run."""
    rank = {mid: i for i, mid in enumerate(posted)}
    seen: set[str] = set()
    ranks = []
    for mid in order:
        if mid in rank and mid not in seen:
            seen.add(mid)
            ranks.append(rank[mid])
    tails: list[int] = []  # longest increasing subsequence, patience sorting
    for r in ranks:
        k = bisect.bisect_left(tails, r)
        tails[k:k + 1] = [r]
    return len(ranks) - len(tails)


async def part_burst(rig: Rig, cfg: dict, bound: float) -> dict:
    total, n_topics = cfg["burst"], cfg["burst_topics"]
    topics = [f"burst-{i}" for i in range(n_topics)]
    posted: dict[str, list[str]] = collections.defaultdict(list)
    seq_of: dict[str, int] = {}
    timings: list[Any] = []
    prompts: list[int] = []
    live: dict[str, list[str]] = collections.defaultdict(list)
    failed: list[GenerationFailed] = []
    rejected: list[MessageRejected] = []
    last_end = [0.0]
    done = asyncio.Event()

    async def on_evt(msg: Any) -> None:
        try:
            event = decode_topic_event(msg.data)
        except LamaError:
            return
        if isinstance(event, GenerationCompleted):
            live[event.topic].append(event.request_id)
            timings.append(event.timing)
            prompts.append(event.usage.prompt_tokens)
        elif isinstance(event, GenerationFailed):
            failed.append(event)
        elif isinstance(event, MessageRejected):
            rejected.append(event)
        else:
            return
        last_end[0] = time.monotonic()
        if sum(map(len, live.values())) + len(failed) + len(rejected) >= total:
            done.set()

    await rig.nc.subscribe(f"{PREFIX}.topic.*.evt", cb=on_evt, pending_msgs_limit=1 << 20)
    await rig.nc.flush()
    began = time.monotonic()
    for n in range(total):
        topic = topics[n % n_topics]
        message = chat(topic, f"Say {n}.", ONE_TOKEN, author="crowd")
        posted[topic].append(message.id)
        ack = await rig.js.publish(S.msg(topic), encode(message), headers={MSG_ID: message.id})
        seq_of[message.id] = ack.seq
    post_seconds = time.monotonic() - began
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(1.0, bound - (time.monotonic() - began))):
            await done.wait()
    seconds = (last_end[0] or time.monotonic()) - began
    answered_live = sum(map(len, live.values()))
    bounded = not done.is_set()
    settled = await rig.settled(5.0 if bounded else 30.0)
    await asyncio.sleep(1.0)
    # A message without a reply is lost only if the consumer has settled it (at or below its ack
    # floor); one the consumer has not delivered yet still waits in the stream, and one between
    # the two is in the intake's window. Cut off by the bound, those are queued, not lost.
    info = await rig.js.consumer_info(S.stream_name, CONSUMER)
    floor, delivered = info.ack_floor.stream_seq, info.delivered.stream_seq
    # The stream is the judge: exactly one reply and one completion per message, in order per topic.
    lost = duplicated = violations = 0
    answered = queued = in_window = 0
    for topic in topics:
        events = await rig.stored(topic)
        check = exactly_once(events, posted[topic])
        duplicated += check["duplicated"]
        replied = {e.reply_to for e in events if isinstance(e, ChatMessage) and e.reply_to}
        done = {e.request_id for e in events if isinstance(e, GenerationCompleted)}
        for mid in posted[topic]:
            if mid in replied and mid in done:
                answered += 1
            elif seq_of[mid] <= floor:
                lost += 1
            elif seq_of[mid] > delivered:
                queued += 1
            else:
                in_window += 1
        order = [e.reply_to for e in events if isinstance(e, ChatMessage) and e.reply_to]
        violations += _out_of_order(order, posted[topic])
        violations += _out_of_order(live[topic], posted[topic])
    return {
        "planned": total, "topics": n_topics, "reached": answered_live + len(failed) + len(rejected),
        "bounded": bounded,
        "answered": answered, "lost": lost, "duplicated": duplicated, "order_violations": violations,
        "unanswered_at_bound_queued_in_stream": queued, "unanswered_at_bound_in_intake_window": in_window,
        "refused_busy": sum(1 for f in failed if str(f.error.code) in ("busy", "ErrorCode.BUSY")),
        "failed": counter(str(f.error.code) for f in failed), "rejected": len(rejected),
        "messages_per_s": round(answered_live / seconds, 1) if seconds > 0 else None,
        "prompt_tokens_p50": statistics.median(prompts) if prompts else None, **timing_figures(timings),
        "post_seconds": round(post_seconds, 2), "seconds": round(seconds, 1), "consumer_settled": settled,
        "crashes": 0 if rig.serve is not None and rig.serve.alive else 1,
    }

