"""The soak's world for one part (bench/soak.py): a nats-server on a free port, ``lamabus serve``
on it (bench/serve_process.py, lenient), an observer connection, and what every part reads
back from the stream: first tokens, ends, exactly-once counts, the answers' own timing."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import statistics
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec

from bench.serve_process import ServeProcess
from bus.broker.connection import connect
from bus.broker.embedded import EmbeddedNatsServer
from bus.node.intake import CONSUMER
from bus.node.publisher import MSG_ID
from bus.replay.command import records
from bus.subjects import Subjects
from wire.identity import person_id_for
from wire.messages import (
    ChatMessage,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationToken,
    decode_topic_event,
    encode,
)
from wire.params import GenerationParams

PREFIX = "lama"
S = Subjects(PREFIX)
COUNTING = "Count from 1 to 200, separated by commas."
ONE_TOKEN = GenerationParams(max_tokens=1, temperature=0.0)
#: A model load and a first start take a while on a busy 2-core machine.
SERVE_READY_TIMEOUT = 120.0


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def chat(topic: str, text: str, params: GenerationParams, author: str = "soak") -> ChatMessage:
    return ChatMessage(id=str(uuid.uuid4()), topic=topic, author_id=author, text=text,
                       sent_at=datetime.now(timezone.utc), params=params)


def long_params(tokens: int) -> GenerationParams:
    return GenerationParams(max_tokens=tokens, temperature=0.0, seed=1, stop=[])


class Rig:
    """One part's world: a nats-server on a free port, ``lamabus serve`` on it, and an observer connection."""

    def __init__(self, work: Path, name: str) -> None:
        self.dir = work / name
        self.dir.mkdir(parents=True)
        self.broker = EmbeddedNatsServer(self.dir / "jetstream")
        self.config = self.dir / "lamabus.toml"
        # The burst is one author's 1,000 messages at once: per-author quotas (issue 20.4) would refuse most.
        self.config.write_text('[lamabus]\nlog_level = "info"\nhistory_cache_turns = 2\nweb = "off"\n'
                               'quota_messages_per_minute = 0\nquota_running_per_author = 0\n')
        self.serve: ServeProcess | None = None
        self.nc: Any = None
        self.js: Any = None
        self.start_seconds: list[float] = []

    async def __aenter__(self) -> "Rig":
        url = await self.broker.start()
        self.serve = ServeProcess(url, self.dir / "data", self.config, strict=False)
        self.start_seconds.append(await self.serve.start(SERVE_READY_TIMEOUT))
        self.nc = await connect(url, name="soak-observer")
        self.js = self.nc.jetstream()
        # "lamabus ready" is logged before the client has flushed the API's SUBs to the broker
        # (bus/node/app.py): a request at once can meet "no responders". Wait until PING answers.
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
        self.start_seconds.append(await self.serve.start(SERVE_READY_TIMEOUT))

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


def counter(values: Any) -> dict[str, int]:
    return dict(sorted(collections.Counter(values).items()))


def find_counter(doc: Any, name: str) -> int | None:
    """``name``'s value anywhere in a diagnostics document (the assistant's counters)."""
    if isinstance(doc, dict):
        if name in doc and isinstance(doc[name], int):
            return doc[name]
        for value in doc.values():
            found = find_counter(value, name)
            if found is not None:
                return found
    elif isinstance(doc, list):
        for value in doc:
            found = find_counter(value, name)
            if found is not None:
                return found
    return None


async def first_token(rig: Rig, message: ChatMessage, timeout: float = 90.0) -> tuple[int, float]:
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


async def wait_end(rig: Rig, topic: str, mid: str, from_seq: int, timeout: float) -> Any:
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


def timing_figures(timings: list[Any]) -> dict:
    """The answering generation's own timing (medians): how much of a recovery is the generation itself."""
    if not timings:
        return {}
    med = statistics.median
    return {"answer_elapsed_p50_s": round(med(t.elapsed_time for t in timings) / 1000, 2),
            "answer_queue_p50_s": round(med(t.queue_time for t in timings) / 1000, 2),
            "answer_tokens_per_s_p50": round(med(t.tokens_per_second for t in timings), 1)}


def exactly_once(events: list, mids: list[str]) -> dict:
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

