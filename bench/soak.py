"""The soak: hostile payloads, kills, broker restarts and a burst against a real ``lamabus serve`` (issue 16).

    .venv/bin/python -m bench.soak                 # full run, about 25 minutes on 2 cores
    .venv/bin/python -m bench.soak --quick         # smoke run (a few minutes)
    .venv/bin/python -m bench.soak --parts hostile,burst --json /tmp/soak.json

Everything runs on loopback: each part starts its own nats-server (bus.embedded, a free port,
its own store) and ``lamabus serve --nats-url`` as a subprocess with its own data directory,
and every wait has a deadline. A part that reaches its time bound stops and reports how far it
got (``reached`` of ``planned``, ``bounded: true``). The parts:

1. ``hostile``: bench/hostile.py's topic, cancel and API payloads, shuffled, over a raw NATS
   connection, the first share one at a time (each flushed, a request's reply awaited) and the
   rest in batches. Meanwhile ``$SRV.PING.lamabus`` every second: a ping unanswered in 2 s is a
   deaf second, consecutive ones a deaf period. The serve process is watched: an exit is a
   crash (it is restarted). Each payload must get its structured answer: a ``message.rejected``
   (on ``<prefix>.topic.*.evt`` or ``<prefix>.rejected``), a completion (or a failure or a
   cancellation) for the valid ones, a reply for each request, or, for an AI author, deliberately
   nothing (the service's ``ignored_ai`` counter). Whatever got none is a silent drop.
2. ``kill``: a long generation is posted, at its first token ``serve`` is SIGKILLed and started
   again; the stream must then hold exactly one AI reply ``chat.message`` and one
   ``generation.completed`` per message (lost: none, duplicated: more). Kill -> completed is timed.
3. ``broker``: the same with the nats-server stopped (SIGKILL and SIGTERM alternately) and started
   on the same port and store while the reply streams.
4. ``burst``: messages over many topics posted at once (maxTokens 1, temperature 0, the service
   with ``history_cache_turns = 2``): answered, lost, duplicated (in the stream), per-topic order
   violations, refused (``busy``), messages/s.

The figures go to bench/soak.json (``--json``) and a table is printed. The goal of every crash,
deaf, drop, loss, duplicate, order and refusal figure is 0; ``zero_goal`` lists them with where
they stand.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

from bench.hostile import Hostile, RawPublisher, api_payloads, cancel_payloads, topic_payloads  # noqa: E402
from bus.connection import connect  # noqa: E402
from bus.embedded import EmbeddedNatsServer  # noqa: E402
from bus.intake import CONSUMER  # noqa: E402
from bus.publisher import MSG_ID  # noqa: E402
from bus.replay import records  # noqa: E402
from bus.subjects import Subjects  # noqa: E402
from wire.errors import LamaError  # noqa: E402
from wire.identity import person_id_for  # noqa: E402
from wire.messages import (  # noqa: E402
    ChatMessage,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationToken,
    MessageRejected,
    decode_topic_event,
    encode,
)
from wire.params import GenerationParams  # noqa: E402

PREFIX = "lama"
S = Subjects(PREFIX)
COUNTING = "Count from 1 to 200, separated by commas."
ONE_TOKEN = GenerationParams(max_tokens=1, temperature=0.0)

FULL = {"payloads": 10_000, "one_at_a_time": 2_000, "batch": 100, "kills": 20, "broker_restarts": 10,
        "burst": 1_000, "burst_topics": 50, "long_tokens": 24,
        "bounds": {"hostile": 420.0, "kill": 420.0, "broker": 240.0, "burst": 360.0}}
QUICK = {"payloads": 300, "one_at_a_time": 60, "batch": 40, "kills": 2, "broker_restarts": 2,
         "burst": 100, "burst_topics": 10, "long_tokens": 24,
         "bounds": {"hostile": 180.0, "kill": 150.0, "broker": 120.0, "burst": 150.0}}
PARTS = ("hostile", "kill", "broker", "burst")


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def chat(topic: str, text: str, params: GenerationParams, author: str = "soak") -> ChatMessage:
    return ChatMessage(id=str(uuid.uuid4()), topic=topic, author_id=author, text=text,
                       sent_at=datetime.now(timezone.utc), params=params)


def long_params(tokens: int) -> GenerationParams:
    return GenerationParams(max_tokens=tokens, temperature=0.0, seed=1, stop=[])


# -- processes ---------------------------------------------------------------------------


class Serve:
    """``lamabus serve`` as a child in its own process group; stderr kept (the last lines) and watched."""

    def __init__(self, nats_url: str, data_dir: Path, config: Path) -> None:
        self.args = [sys.executable, "-m", "bus.cli", "serve", "--nats-url", nats_url, "--data-dir", str(data_dir),
                     "--config", str(config)]
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self.tracebacks = 0
        self.errors = 0
        self._ready = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 120.0) -> float:
        """Start and wait for "lamabus ready"; returns the seconds it took."""
        began = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAMABUS_")}
        self._ready = asyncio.Event()
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        self._reader = asyncio.create_task(self._read(self.proc))
        ready = asyncio.create_task(self._ready.wait())
        exited = asyncio.create_task(self.proc.wait())
        try:
            await asyncio.wait({ready, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        if not self._ready.is_set():
            raise RuntimeError("lamabus serve did not get ready:\n" + self.tail())
        return time.monotonic() - began

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self.lines.append(text)
            if "Traceback" in text:
                self.tracebacks += 1
            if " ERROR " in text or text.startswith("ERROR"):
                self.errors += 1
            if "lamabus ready" in text:
                self._ready.set()

    def tail(self, n: int = 30) -> str:
        return "\n".join(list(self.lines)[-n:])

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def kill(self) -> None:
        """SIGKILL the service process alone (a crash); its engine worker must follow by itself."""
        assert self.proc is not None
        pid = self.proc.pid
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        await self._finish_reader()
        deadline = time.monotonic() + 15
        while _group_members(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _finish_reader(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(15):
                    await self._reader
            self._reader = None

    async def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after 30 s); then reap the whole process group."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await self.proc.wait()
            except TimeoutError:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        return self.proc.returncode


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


class Rig:
    """One part's world: a nats-server on a free port, ``lamabus serve`` on it, and an observer connection."""

    def __init__(self, work: Path, name: str) -> None:
        self.dir = work / name
        self.dir.mkdir(parents=True)
        self.broker = EmbeddedNatsServer(self.dir / "jetstream")
        self.config = self.dir / "lamabus.toml"
        self.config.write_text('[lamabus]\nlog_level = "info"\nhistory_cache_turns = 2\nweb = "off"\n')
        self.serve: Serve | None = None
        self.nc: Any = None
        self.js: Any = None
        self.start_seconds: list[float] = []

    async def __aenter__(self) -> "Rig":
        url = await self.broker.start()
        self.serve = Serve(url, self.dir / "data", self.config)
        self.start_seconds.append(await self.serve.start())
        self.nc = await connect(url, name="soak-observer")
        self.js = self.nc.jetstream()
        # "lamabus ready" is logged before the client has flushed the API's SUBs to the broker
        # (bus/app.py): a request at once can meet "no responders". Wait until PING answers.
        deadline = time.monotonic() + 30
        while True:
            try:
                await self.nc.request("$SRV.PING.lamabus", b"", timeout=2)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        if self.serve is not None:
            await self.serve.stop()
        await self.broker.stop()

    async def restart_serve(self) -> None:
        assert self.serve is not None
        self.start_seconds.append(await self.serve.start())

    async def ai_person_id(self) -> str:
        reply = await self.nc.request(f"{PREFIX}.api.models.list", b"{}", timeout=30)
        doc = msgspec.json.decode(reply.data)
        active = doc.get("activeModelId")
        for model in doc.get("models", []):
            if model.get("id") == active and model.get("personId"):
                return model["personId"]
        return person_id_for(active or "")

    async def diagnostics(self) -> dict:
        with contextlib.suppress(Exception):
            reply = await self.nc.request(f"{PREFIX}.api.diagnostics", b"{}", timeout=30)
            return msgspec.json.decode(reply.data)
        return {}

    async def settled(self, timeout: float) -> bool:
        """Until the service's durable consumer has nothing pending and nothing unacknowledged."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                info = await self.js.consumer_info(S.stream_name, CONSUMER)
                if not info.num_pending and not info.num_ack_pending:
                    return True
            await asyncio.sleep(0.2)
        return False

    async def stored(self, topic: str, timeout: float = 60.0) -> list:
        """Every record of ``topic`` in the stream (retried across a broker that is coming back)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                async with contextlib.aclosing(records(self.js, topic, prefix=PREFIX)) as recs:
                    return [r.event async for r in recs]
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


def _counter(values: Any) -> dict[str, int]:
    return dict(sorted(collections.Counter(values).items()))


def _find_counter(doc: Any, name: str) -> int | None:
    """``name``'s value anywhere in a diagnostics document (the assistant's counters)."""
    if isinstance(doc, dict):
        if name in doc and isinstance(doc[name], int):
            return doc[name]
        for value in doc.values():
            found = _find_counter(value, name)
            if found is not None:
                return found
    elif isinstance(doc, list):
        for value in doc:
            found = _find_counter(value, name)
            if found is not None:
                return found
    return None


# -- 1. hostile payloads ---------------------------------------------------------------------


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
            self.crashes.append({"exit": code, "at": now_iso(), "log": serve.tail(15)})
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
    ignored_ai = _find_counter(diag, "ignored_ai")

    # Replies to requests: a coded error (micro error header) or a decodable answer; never none.
    reply_codes: collections.Counter[str] = collections.Counter()
    for idx in requests:
        msg = replies.get(idx)
        if msg is None:
            reply_codes["none"] += 1
        else:
            reply_codes[(msg.headers or {}).get("Nats-Service-Error-Code", "ok")] += 1
    answered_ends = collections.Counter(ends[mid][0] if ends.get(mid) else "none" for mid in answer_ids)
    rejection_codes = _counter(str(r.error.code) for r in rejected)
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
        "by_kind": _counter(_label(h) for h in published),
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


# -- 2./3. kills and broker restarts mid-generation --------------------------------------------


async def _first_token(rig: Rig, message: ChatMessage, timeout: float = 90.0) -> tuple[int, float]:
    """Post ``message``; return its stream sequence and when its first token came."""
    sub = await rig.nc.subscribe(S.tok(message.topic))
    try:
        await rig.nc.flush()
        ack = await rig.js.publish(S.msg(message.topic), encode(message), headers={MSG_ID: message.id})
        async with asyncio.timeout(timeout):
            while True:
                token = decode_topic_event((await sub.next_msg(timeout=timeout)).data)
                if isinstance(token, GenerationToken) and token.request_id == message.id:
                    return ack.seq, time.monotonic()
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _wait_end(rig: Rig, topic: str, mid: str, from_seq: int, timeout: float) -> Any:
    """The completed/failed/cancelled event of ``mid`` read from the stream (across broker restarts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                async with contextlib.aclosing(records(rig.js, topic, prefix=PREFIX, from_seq=from_seq,
                                                       follow=True, idle=0.5)) as recs:
                    async for rec in recs:
                        match rec.event:
                            case GenerationCompleted(request_id=rid) | GenerationFailed(request_id=rid) | \
                                    GenerationCancelled(request_id=rid) if rid == mid:
                                return rec.event
        except TimeoutError:
            return None
        except Exception:
            await asyncio.sleep(0.5)  # the broker coming back: read again
    return None


def _timing_figures(timings: list[Any]) -> dict:
    """The answering generation's own timing (medians): how much of a recovery is the generation itself."""
    if not timings:
        return {}
    med = statistics.median
    return {"answer_elapsed_p50_s": round(med(t.elapsed_time for t in timings) / 1000, 2),
            "answer_queue_p50_s": round(med(t.queue_time for t in timings) / 1000, 2),
            "answer_tokens_per_s_p50": round(med(t.tokens_per_second for t in timings), 1)}


def _exactly_once(events: list, mids: list[str]) -> dict:
    replies = collections.Counter(e.reply_to for e in events if isinstance(e, ChatMessage) and e.reply_to)
    done = collections.Counter(e.request_id for e in events if isinstance(e, GenerationCompleted))
    reply_ids = collections.defaultdict(set)
    for e in events:
        if isinstance(e, ChatMessage) and e.reply_to:
            reply_ids[e.reply_to].add(e.id)
    return {
        "lost": sum(1 for m in mids if replies[m] == 0 or done[m] == 0),
        "duplicated": sum(1 for m in mids if replies[m] > 1 or done[m] > 1 or len(reply_ids[m]) > 1),
        "duplicated_replies": sum(max(0, replies[m] - 1) for m in mids),
        "duplicated_completions": sum(max(0, done[m] - 1) for m in mids),
    }


async def part_kill(rig: Rig, cfg: dict, bound: float) -> dict:
    began = time.monotonic()
    topic = "soak-kill"
    mids: list[str] = []
    recovery: list[float] = []
    ends: collections.Counter[str] = collections.Counter()
    finished_before_kill = 0
    crashes = 0
    timings: list[Any] = []
    accepted: list[float] = []
    params = long_params(cfg["long_tokens"])
    for _ in range(cfg["kills"]):
        if time.monotonic() - began > bound * 0.85:
            break
        assert rig.serve is not None
        message = chat(topic, COUNTING, params)
        mids.append(message.id)
        seq, _ = await _first_token(rig, message)
        if not rig.serve.alive:
            crashes += 1
        await rig.serve.kill()
        killed, killed_wall = time.monotonic(), time.time()
        events = await rig.stored(topic)
        if any(isinstance(e, GenerationCompleted) and e.request_id == message.id for e in events):
            finished_before_kill += 1
        await rig.restart_serve()
        ended = await _wait_end(rig, topic, message.id, seq, timeout=120.0)
        if ended is None:
            ends["none"] += 1
            continue
        ends[type(ended).__name__] += 1
        if isinstance(ended, GenerationCompleted):
            recovery.append(time.monotonic() - killed)
            timings.append(ended.timing)
            # When the restarted service accepted the redelivered message (the engine's start less its queue).
            accepted.append((ended.timing.start_time - ended.timing.queue_time) / 1000 - killed_wall)
    settled = await rig.settled(60.0)
    await asyncio.sleep(1.0)
    check = _exactly_once(await rig.stored(topic), mids)
    alive = rig.serve is not None and rig.serve.alive
    return {
        "planned": cfg["kills"], "reached": len(mids), "bounded": len(mids) < cfg["kills"],
        **check, "ends": dict(ends), "finished_before_kill": finished_before_kill,
        "kill_to_completed_p50_s": round(statistics.median(recovery), 2) if recovery else None,
        "kill_to_completed_max_s": round(max(recovery), 2) if recovery else None,
        "kill_to_accepted_again_p50_s": round(statistics.median(accepted), 2) if accepted else None,
        "kill_to_accepted_again_max_s": round(max(accepted), 2) if accepted else None,
        **_timing_figures(timings),
        "restart_to_ready_p50_s": round(statistics.median(rig.start_seconds[1:]), 2) if len(rig.start_seconds) > 1
        else None,
        "crashes": crashes, "consumer_settled": settled, "alive_after": alive,
        "seconds": round(time.monotonic() - began, 1),
    }


async def part_broker(rig: Rig, cfg: dict, bound: float) -> dict:
    began = time.monotonic()
    topic = "soak-broker"
    mids: list[str] = []
    ends: collections.Counter[str] = collections.Counter()
    back: list[float] = []
    timings: list[Any] = []
    params = long_params(cfg["long_tokens"])
    for n in range(cfg["broker_restarts"]):
        if time.monotonic() - began > bound * 0.85:
            break
        message = chat(topic, COUNTING, params)
        mids.append(message.id)
        seq, _ = await _first_token(rig, message)
        if n % 2 == 0:
            await rig.broker.kill()
        else:
            await rig.broker.stop()
        down = time.monotonic()
        await asyncio.sleep(0.5)
        await rig.broker.start()  # the same port and store
        ended = await _wait_end(rig, topic, message.id, seq, timeout=120.0)
        ends[type(ended).__name__ if ended is not None else "none"] += 1
        if isinstance(ended, GenerationCompleted):
            back.append(time.monotonic() - down)
            timings.append(ended.timing)
    settled = await rig.settled(60.0)
    await asyncio.sleep(1.0)
    check = _exactly_once(await rig.stored(topic), mids)
    crashes = 0 if rig.serve is not None and rig.serve.alive else 1
    return {
        "planned": cfg["broker_restarts"], "reached": len(mids), "bounded": len(mids) < cfg["broker_restarts"],
        **check, "ends": dict(ends), "crashes": crashes,
        "restart_to_completed_p50_s": round(statistics.median(back), 2) if back else None,
        "restart_to_completed_max_s": round(max(back), 2) if back else None,
        **_timing_figures(timings),
        "consumer_settled": settled, "seconds": round(time.monotonic() - began, 1),
    }


# -- 4. the burst ------------------------------------------------------------------------------


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
    import bisect
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
        check = _exactly_once(events, posted[topic])
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
        "failed": _counter(str(f.error.code) for f in failed), "rejected": len(rejected),
        "messages_per_s": round(answered_live / seconds, 1) if seconds > 0 else None,
        "prompt_tokens_p50": statistics.median(prompts) if prompts else None, **_timing_figures(timings),
        "post_seconds": round(post_seconds, 2), "seconds": round(seconds, 1), "consumer_settled": settled,
        "crashes": 0 if rig.serve is not None and rig.serve.alive else 1,
    }


# -- the run -------------------------------------------------------------------------------------

RUNNERS = {"hostile": part_hostile, "kill": part_kill, "broker": part_broker, "burst": part_burst}
#: Figures whose goal is 0, per part.
ZERO = {"hostile": ("crashes", "deaf_periods", "silent_drops", "internal_errors", "extra_rejections"),
        "kill": ("lost", "duplicated", "crashes"),
        "broker": ("lost", "duplicated", "crashes"),
        "burst": ("lost", "duplicated", "order_violations", "refused_busy", "crashes")}


async def run(parts: list[str], cfg: dict, work: Path) -> dict:
    results: dict[str, Any] = {}
    for name in parts:
        bound = cfg["bounds"][name]
        print(f"[soak] {name}: bound {bound:.0f} s ...", file=sys.stderr, flush=True)
        load_before = os.getloadavg()[0]
        try:
            async with Rig(work, name) as rig:
                async with asyncio.timeout(bound + 240):  # the part's own bound, plus its final checks
                    results[name] = await RUNNERS[name](rig, cfg, bound)
                results[name]["serve_log_errors"] = rig.serve.errors if rig.serve else None
        except Exception as exc:  # a part that breaks says so; the others still run
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["date"] = now_iso()
        # The machine's load (1-minute average) around the part: llama.cpp's decode threads stall
        # when others take the cores, so times and rates only compare at similar load.
        results[name]["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        print(f"[soak] {name}: {json.dumps(results[name], default=str)[:600]}", file=sys.stderr, flush=True)
    return results


def zero_goal(results: dict) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for part, names in ZERO.items():
        if part in results:
            for name in names:
                out[f"{part}.{name}"] = results[part].get(name)
    return out


def table(doc: dict) -> str:
    rows: list[tuple[str, str, str]] = []
    parts = doc["parts"]

    def add(part: str, label: str, key: str, goal: str = "") -> None:
        if part in parts:
            rows.append((label, str(parts[part].get(key, parts[part].get("error", "-"))), goal))

    h = parts.get("hostile", {})
    if "hostile" in parts:
        rows.append(("hostile payloads published", f"{h.get('reached')} of {h.get('planned')}", ""))
    add("hostile", "  crashes (serve exits)", "crashes", "0")
    add("hostile", "  deaf periods (PING unanswered 2 s)", "deaf_periods", "0")
    add("hostile", "  silent drops", "silent_drops", "0")
    add("hostile", "  structured answers", "structured_answers")
    add("hostile", "  deliberately ignored (AI author)", "deliberately_ignored")
    add("hostile", "  internal errors", "internal_errors", "0")
    k = parts.get("kill", {})
    if "kill" in parts:
        rows.append(("serve SIGKILLed mid-generation", f"{k.get('reached')} of {k.get('planned')}", ""))
    add("kill", "  lost", "lost", "0")
    add("kill", "  duplicated", "duplicated", "0")
    add("kill", "  kill -> completed p50 (s)", "kill_to_completed_p50_s")
    add("kill", "  kill -> completed max (s)", "kill_to_completed_max_s")
    add("kill", "  kill -> accepted again p50 (s)", "kill_to_accepted_again_p50_s")
    add("kill", "  answer's own generation p50 (s)", "answer_elapsed_p50_s")
    b = parts.get("broker", {})
    if "broker" in parts:
        rows.append(("broker restarted mid-stream", f"{b.get('reached')} of {b.get('planned')}", ""))
    add("broker", "  lost", "lost", "0")
    add("broker", "  duplicated", "duplicated", "0")
    add("broker", "  serve exits", "crashes", "0")
    u = parts.get("burst", {})
    if "burst" in parts:
        rows.append((f"burst over {u.get('topics')} topics", f"{u.get('planned')} posted", ""))
    add("burst", "  answered", "answered")
    add("burst", "  lost", "lost", "0")
    add("burst", "  duplicated", "duplicated", "0")
    add("burst", "  per-topic order violations", "order_violations", "0")
    add("burst", "  refused (busy)", "refused_busy", "0")
    add("burst", "  messages/s", "messages_per_s")
    width = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"{'figure':<{width}}  {'value':>12}  goal", "-" * (width + 20)]
    lines += [f"{label:<{width}}  {value:>12}  {goal}" for label, value, goal in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts and bounds: a smoke run")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--payloads", type=int, help="hostile payloads (full 10000)")
    ap.add_argument("--kills", type=int, help="serve SIGKILLs (full 20)")
    ap.add_argument("--broker-restarts", type=int, help="broker restarts (full 10)")
    ap.add_argument("--burst", type=int, help="burst messages (full 1000)")
    ap.add_argument("--burst-topics", type=int, help="burst topics (full 50)")
    ap.add_argument("--bound-scale", type=float, default=1.0,
                    help="multiply every part's time bound (a slow or busy machine)")
    ap.add_argument("--update", action="store_true",
                    help="keep the other parts already in the --json file (each part says its own date and command)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "soak.json"), help="where the figures go")
    ap.add_argument("--workdir", help="where the brokers' stores and data directories go (a temporary dir)")
    args = ap.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = json.loads(json.dumps(QUICK if args.quick else FULL))
    for key in ("payloads", "kills", "broker_restarts", "burst", "burst_topics"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg["bounds"] = {k: v * args.bound_scale for k, v in cfg["bounds"].items()}
    cfg["one_at_a_time"] = min(cfg["one_at_a_time"], cfg["payloads"] // 5)
    parts = [p for p in PARTS if p in args.parts.split(",")]
    work = Path(tempfile.mkdtemp(prefix="lamabus-soak-", dir=args.workdir))
    started = time.monotonic()
    try:
        results = asyncio.run(run(parts, cfg, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    for part in results.values():
        part["command"] = command
    if args.update and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        kept = {name: {"command": old.get("command"), "date": old.get("date"), **part}
                for name, part in old.get("parts", {}).items() if name not in results}
        results = {name: (results[name] if name in results else kept[name])
                   for name in PARTS if name in results or name in kept}
    doc = {
        "command": command,
        "date": now_iso(), "quick": args.quick, "config": cfg, "seconds": round(time.monotonic() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "parts": results,
    }
    doc["zero_goal"] = zero_goal(results)
    doc["all_zero"] = all(v == 0 for v in doc["zero_goal"].values()) and not any("error" in r for r in results.values())
    Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(table(doc))
    print(f"\nall figures that should be 0 are 0: {doc['all_zero']}  ({args.json}, {doc['seconds']:.0f} s)")
    return 0 if doc["all_zero"] else 1


if __name__ == "__main__":
    sys.exit(main())
