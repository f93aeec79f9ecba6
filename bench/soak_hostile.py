"""The soak's first part (bench/soak.py): bench/hostile.py's payloads against ``lamabus serve``,
with its liveness watched (PING every second, a crashed serve restarted), and every payload's
structured answer accounted for."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import time
from typing import Any

from bench.hostile import Hostile, RawPublisher, api_payloads, cancel_payloads, topic_payloads
from bench.soak_rig import PREFIX, S, Rig, counter, find_counter, now_iso
from wire.errors import LamaError
from wire.messages import (
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    MessageRejected,
    decode_topic_event,
)


class Watch:
    """Pings ``$SRV.PING.lamabus`` every ``interval`` s and restarts a serve that exited."""

    def __init__(self, rig: Rig, interval: float = 1.0, timeout: float = 2.0) -> None:
        self.rig, self.interval, self.timeout = rig, interval, timeout
        self.pings = 0
        self.missed = 0
        self.periods: list[float] = []  # length in seconds of each run of missed pings
        self._run_start: float | None = None
        self.crashes: list[dict] = []
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "Watch":
        self._tasks = [asyncio.create_task(self._ping()), asyncio.create_task(self._guard())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._close_run()

    def _close_run(self) -> None:
        if self._run_start is not None:
            self.periods.append(round(time.monotonic() - self._run_start, 1))
            self._run_start = None

    async def _ping(self) -> None:
        while True:
            began = time.monotonic()
            self.pings += 1
            try:
                await self.rig.nc.request("$SRV.PING.lamabus", b"", timeout=self.timeout)
                self._close_run()
            except Exception:
                self.missed += 1
                if self._run_start is None:
                    self._run_start = began
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - began)))

    async def _guard(self) -> None:
        serve = self.rig.serve
        assert serve is not None
        while True:
            code = await serve.wait()
            self.crashes.append({"exit": code, "at": now_iso(), "log": serve.log_tail(15)})
            await serve.stop()
            await self.rig.restart_serve()


def _label(h: Hostile) -> str:
    if h.expect != "reply":
        return f"msg: {h.kind}"
    if h.kind == "api":
        return "api: " + h.subject.split(b".", 2)[2].decode()
    return f"cancel: {h.kind}"


async def part_hostile(rig: Rig, cfg: dict, bound: float) -> dict:
    nc = rig.nc
    rng = random.Random(16)
    person = await rig.ai_person_id()
    total = cfg["payloads"]
    n_topic = total * 7 // 10
    n_cancel = total * 15 // 100
    items: list[Hostile] = [*topic_payloads(PREFIX, person, rng=rng, count=n_topic),
                            *cancel_payloads(PREFIX, rng=rng, count=n_cancel),
                            *api_payloads(PREFIX, rng=rng, count=total - n_topic - n_cancel)]
    rng.shuffle(items)

    rejected: list[MessageRejected] = []
    ends: dict[str, list[str]] = collections.defaultdict(list)  # request id -> completed/failed/cancelled

    async def on_event(msg: Any) -> None:
        try:
            event = decode_topic_event(msg.data)
        except LamaError:
            return
        if isinstance(event, MessageRejected):
            rejected.append(event)
        elif isinstance(event, GenerationCompleted):
            ends[event.request_id].append("completed")
        elif isinstance(event, GenerationFailed):
            ends[event.request_id].append(f"failed.{event.error.code}")
        elif isinstance(event, GenerationCancelled):
            ends[event.request_id].append("cancelled")

    replies: dict[int, Any] = {}
    reply_seen = asyncio.Event()

    async def on_reply(msg: Any) -> None:
        with contextlib.suppress(ValueError):
            replies[int(msg.subject.rsplit(".", 1)[1])] = msg
            reply_seen.set()

    limits = {"pending_msgs_limit": 1 << 20, "pending_bytes_limit": 1 << 30}
    await nc.subscribe(f"{PREFIX}.topic.*.evt", cb=on_event, **limits)
    await nc.subscribe(S.rejected, cb=on_event, **limits)
    await nc.subscribe("_SOAK.>", cb=on_reply, **limits)
    await nc.flush()

    requests: dict[int, Hostile] = {}
    published: list[Hostile] = []
    began = time.monotonic()
    deadline = began + bound * 0.75  # what is left is for the answers to come in

    async def await_replies(upto: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while any(i not in replies for i in requests if i < upto) and time.monotonic() < end:
            reply_seen.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.01, end - time.monotonic())):
                    await reply_seen.wait()

    async with Watch(rig) as watch:
        i = 0
        async with RawPublisher(rig.broker.url or "") as raw:
            while i < len(items) and time.monotonic() < deadline:
                size = 1 if i < cfg["one_at_a_time"] else cfg["batch"]
                for h in items[i:i + size]:
                    if h.expect == "reply":
                        requests[i] = h
                        raw.publish(h.subject, h.data, reply=f"_SOAK.{i}".encode())
                    else:
                        raw.publish(h.subject, h.data)
                    published.append(h)
                    i += 1
                await raw.flush()
                # One at a time: a request's reply before the next payload. Batches: each batch's
                # replies (bounded) before the next, as a client with a window would.
                await await_replies(i, timeout=10.0)
        publish_seconds = time.monotonic() - began

        # The answers: everything taken and settled, every rejection and reply in.
        expected = collections.Counter(h.expect for h in published)
        answer_ids = {json.loads(h.data)["id"] for h in published if h.expect == "answered"}
        end = began + bound
        settled = await rig.settled(max(5.0, end - time.monotonic()))
        while time.monotonic() < end and (len(rejected) < expected["rejected"] or not answer_ids <= ends.keys()
                                          or len(replies) < len(requests)):
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)  # anything late (a second rejection would show here)
        ping_ok = True
        try:
            await nc.request("$SRV.PING.lamabus", b"", timeout=5)
        except Exception:
            ping_ok = False
    diag = await rig.diagnostics()
    ignored_ai = find_counter(diag, "ignored_ai")

    # Replies to requests: a coded error (micro error header) or a decodable answer; never none.
    reply_codes: collections.Counter[str] = collections.Counter()
    for idx in requests:
        msg = replies.get(idx)
        if msg is None:
            reply_codes["none"] += 1
        else:
            reply_codes[(msg.headers or {}).get("Nats-Service-Error-Code", "ok")] += 1
    answered_ends = collections.Counter(ends[mid][0] if ends.get(mid) else "none" for mid in answer_ids)
    rejection_codes = counter(str(r.error.code) for r in rejected)
    missing_rejections = max(0, expected["rejected"] - len(rejected))
    extra_rejections = max(0, len(rejected) - expected["rejected"])
    # AI-authored messages: the payloads that are ignored, and every AI reply the service posted
    # itself (they come back through the intake the same way).
    ai_expected = expected["ignored"] + answered_ends["completed"]
    # An AI-authored message the service never saw (the counter restarts with a crashed service).
    ai_unseen = max(0, ai_expected - ignored_ai) if ignored_ai is not None and not watch.crashes else 0
    silent = missing_rejections + answered_ends["none"] + reply_codes["none"] + ai_unseen
    structured = (len(rejected) - extra_rejections) + (len(answer_ids) - answered_ends["none"]) \
        + (len(requests) - reply_codes["none"])
    return {
        "planned": total,
        "reached": len(published),
        "bounded": len(published) < total,
        "one_at_a_time": min(cfg["one_at_a_time"], len(published)),
        "in_batches_of": cfg["batch"],
        "by_expectation": dict(expected),
        "by_kind": counter(_label(h) for h in published),
        "crashes": len(watch.crashes),
        "crash_logs": watch.crashes[:3],
        "deaf_periods": len(watch.periods),
        "deaf_seconds_longest": max(watch.periods, default=0.0),
        "pings": watch.pings,
        "pings_missed": watch.missed,
        "silent_drops": silent,
        "silent_drops_by_kind": {"rejection missing": missing_rejections, "valid message unanswered":
                                 answered_ends["none"], "request unanswered": reply_codes["none"],
                                 "AI author never seen": ai_unseen},
        "structured_answers": structured,
        "deliberately_ignored": expected["ignored"],
        "ignored_ai_counter": ignored_ai,
        "ignored_ai_expected": ai_expected,
        "extra_rejections": extra_rejections,
        "rejection_codes": rejection_codes,
        "valid_message_ends": dict(answered_ends),
        "request_reply_codes": dict(reply_codes),
        "internal_errors": reply_codes["500"] + rejection_codes.get("internal", 0),
        "consumer_settled": settled,
        "alive_after": ping_ok and rig.serve is not None and rig.serve.alive,
        "publish_seconds": round(publish_seconds, 1),
        "seconds": round(time.monotonic() - began, 1),
        "serve_tracebacks": rig.serve.tracebacks if rig.serve else None,
    }

