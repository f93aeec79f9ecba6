"""The event store on NATS JetStream: one stream, shared by every lamabus node on a cluster.

How the contract of ``storage.store`` maps onto JetStream, and why:

* One JetStream stream (``LAMA_REGISTRY`` for the default prefix) holds the
  whole log. An event's ``position`` is its stream sequence, so positions are
  global, increase in commit order and are assigned by the stream leader, not
  by us. The stream denies deletes and purges: a position once given stays.
* Each event stream is one subject, ``<prefix>.registry.log.<token>``; the
  token is the stream id with every byte outside ``[A-Za-z0-9_-]`` written as
  ``~HH``, so any id is a legal, reversible subject token.
* Every append is one atomic batch (ADR-50: ``Nats-Batch-Id``,
  ``Nats-Batch-Sequence``, ``Nats-Batch-Commit``; the stream has
  ``allow_atomic``): all of its messages are stored, at consecutive sequences,
  or none. A rejected batch stores nothing and uses up no sequence, so
  positions have no gaps.
* The first message of each event stream in a batch carries
  ``Nats-Expected-Last-Subject-Sequence``: the sequence of that subject's last
  message as this handle knows it (0: none). The stream leader checks it under
  its lock, so two writers anywhere in the cluster with the same view cannot
  both commit, and a writer with a stale view cannot commit at all. That fence
  goes on every batch, also for ``expected_version=ANY``, because the version
  numbers we write depend on the view being current.
* Each handle keeps the log in memory, fed by an ephemeral ordered push
  consumer (flow control, idle heartbeats, restarted from the last sequence
  it applied on a gap or a stall, so a lost server costs a restart, not data).
  Before every read and every write the handle asks the stream leader for its
  last sequence and waits until the feed has applied that far: reads see every
  commit that finished before them, on any node, and ``follow`` wakes as soon
  as the feed delivers another node's commit.
* Idempotent retries do not rest on ``Nats-Msg-Id``, whose memory ends with
  the stream's duplicate window: the in-memory log knows every id ever stored,
  and the fence makes the look-up safe. A retry whose original committed after
  our look-up was fenced out by that same commit (same subject); it looks
  again, finds the ids and returns the original positions. The fence cannot
  see the same event id appended concurrently to two *different* event
  streams (a caller error to begin with); for that, every message also carries
  its event id as ``Nats-Msg-Id``, and the server rejects a batch holding an id
  it stored within the window (2.15; servers that refuse the header in batches
  get batches without it).
* Memory: the log lives in every handle, as in a projection rebuild; the
  registry is small (model and topic events), and reading it whole at start is
  what the projections do anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from typing import Any

import anyio
import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from storage.store import (
    AppendResult,
    EventStore,
    StoredEvent,
    _Prepared,
    check_duplicates,
)
from storage.tasks import stop_task
from wire.errors import ErrorCode, LamaError, stream_conflict

log = logging.getLogger(__name__)

#: How long a close waits for the feed task to end after cancelling it (seconds).
FEED_STOP_TIMEOUT = 5.0

REGISTRY_STREAM = "LAMA_REGISTRY"
MAX_BATCH = 1000  # the server's limit on messages per atomic batch (ADR-50)

H_EXPECTED_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
H_BATCH_ID = "Nats-Batch-Id"
H_BATCH_SEQ = "Nats-Batch-Sequence"
H_BATCH_COMMIT = "Nats-Batch-Commit"
H_EVENT_ID = "Lama-Event-Id"
H_TYPE = "Lama-Event-Type"
H_VERSION = "Lama-Version"
H_MSG_ID = "Nats-Msg-Id"

_ERR_STREAM_NOT_FOUND = 10059
_ERR_STREAM_NAME_IN_USE = 10058
_ERR_WRONG_LAST_SEQUENCE = 10071
_ERR_WRONG_LAST_SEQUENCE_CONSTANT = 10164  # the same refusal, as some paths word it ("wrong last sequence")
_ERR_BATCH_INCOMPLETE = 10176  # also what a batch over the server's in-flight limit gets: nothing stored, try again
_ERR_BATCH_UNSUPPORTED_HEADER = 10177  # 2.12's answer to Nats-Msg-Id in a batch
_ERR_BATCH_DUPLICATE_MSG_ID = 10201

_SAFE = re.compile(rb"[A-Za-z0-9_-]")


def encode_stream_id(stream_id: str) -> str:
    """A subject token for any stream id: reversible, and never ``.``, ``*``, ``>`` or whitespace."""
    return "".join(chr(b) if _SAFE.fullmatch(bytes([b])) else f"~{b:02X}" for b in stream_id.encode())


def decode_stream_id(token: str) -> str:
    return re.sub(r"(?:~[0-9A-F]{2})+",
                  lambda m: bytes.fromhex(m.group(0).replace("~", "")).decode(), token)


def registry_stream_name(prefix: str) -> str:
    # Named like bus.subjects' topic stream, so two deployments with different prefixes share a broker.
    suffix = "" if prefix == "lama" else "_" + re.sub(r"[^A-Za-z0-9]", "_", prefix).upper()
    return REGISTRY_STREAM + suffix


class _Outcome(msgspec.Struct, frozen=True):
    last_seq: int = 0
    error: dict[str, Any] | None = None


class JetStreamEventStore(EventStore):
    """``nc`` is a connected nats-py client (the caller keeps owning it) or a URL (this store connects
    and closes). ``timeout`` bounds every operation, failovers included: a stream leader election
    after a server dies takes seconds."""

    def __init__(self, nc: Client | str, *, prefix: str = "lama", stream: str | None = None, replicas: int = 1,
                 timeout: float = 30.0, request_timeout: float = 5.0, heartbeat: float = 0.5,
                 poll_interval: float = 1.0) -> None:
        super().__init__(poll_interval=poll_interval)
        if replicas < 1:
            raise LamaError(ErrorCode.BAD_REQUEST, "replicas must be >= 1", replicas=replicas)
        self._url = nc if isinstance(nc, str) else None
        self._nc: Client | None = None if isinstance(nc, str) else nc
        self.prefix = prefix
        self.stream = stream or registry_stream_name(prefix)
        self.replicas = replicas
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.heartbeat = heartbeat
        self._subject_head = f"{prefix}.registry.log."
        self._rows: list[StoredEvent] = []
        self._base = 0  # position of the first row minus one (a stream purged before we denied purges)
        self._by_id: dict[str, StoredEvent] = {}
        self._streams: dict[str, list[StoredEvent]] = {}
        self._write_lock = anyio.Lock()
        self._feed_task: asyncio.Task[None] | None = None
        self._feed_error: BaseException | None = None
        self._opened = False
        self._msg_ids = True  # until the server says it takes no Nats-Msg-Id in a batch

    # -- lifecycle

    @property
    def subject_filter(self) -> str:
        return self._subject_head + "*"

    def subject(self, stream_id: str) -> str:
        return self._subject_head + encode_stream_id(stream_id)

    async def open(self) -> None:
        if self._opened:
            return
        self._check_open()
        try:
            if self._nc is None:
                assert self._url is not None
                self._nc = await nats.connect(self._url, name="lamabus-registry")
            state = await self._ensure_stream()
            first, msgs, last = state.get("first_seq", 0), state.get("messages", 0), state.get("last_seq", 0)
            self._base = (first - 1 if first > 0 else 0) if msgs else last
            self._feed_task = asyncio.create_task(self._feed(), name=f"{self.stream}-feed")
            await self._sync()
        except BaseException:
            await self._close()
            self._closed = True
            raise
        self._opened = True

    async def _close(self) -> None:
        task, self._feed_task = self._feed_task, None
        if task is not None:
            # Cancelled again while it runs on (a cancel can be swallowed, see _pump), and waited for within a
            # bound: a close ends even if the feed does not, and says where the feed was.
            await stop_task(task, timeout=FEED_STOP_TIMEOUT, what=f"the {self.stream} feed", log=log)
        nc, self._nc = self._nc, None
        if nc is not None and self._url is not None and not nc.is_closed:
            await nc.close()

    def _connection_closed(self) -> LamaError:
        if self._closed:
            return LamaError(ErrorCode.INTERNAL, "event store is closed")
        return LamaError(ErrorCode.INTERNAL, "the event store's NATS connection is closed")

    def _client(self) -> Client:
        if self._nc is None:
            raise LamaError(ErrorCode.INTERNAL, "event store is not open; use 'async with' or await open()")
        return self._nc

    # -- the JetStream API, by hand where nats-py 2.16 lacks a field (allow_atomic, batch headers)

    async def _api(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JetStream API request, retried while the cluster has no leader to answer it."""
        deadline = time.monotonic() + self.timeout
        payload = json.dumps(body).encode() if body is not None else b""
        while True:
            try:
                reply = await self._client().request(subject, payload, timeout=self.request_timeout)
                resp = json.loads(reply.data)
                err = resp.get("error")
                if err is None or err.get("code") != 503:
                    return resp
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError):
                pass
            except nats.errors.ConnectionClosedError:
                raise self._connection_closed() from None
            if time.monotonic() >= deadline:
                raise LamaError(ErrorCode.TIMEOUT, f"JetStream did not answer {subject} within {self.timeout}s",
                                subject=subject)
            await anyio.sleep(0.1)  # a leader election is under way; ask again

    def _stream_config(self) -> dict[str, Any]:
        return {
            "name": self.stream,
            "subjects": [self.subject_filter],
            "retention": "limits",
            "storage": "file",
            "num_replicas": self.replicas,
            "discard": "old",
            "allow_atomic": True,
            # An append-only log: a deleted or purged message would leave a position readers already hold dangling.
            "deny_delete": True,
            "deny_purge": True,
        }

    async def _ensure_stream(self) -> dict[str, Any]:
        """Create the stream if missing; return its state."""
        info = await self._api(f"$JS.API.STREAM.INFO.{self.stream}")
        err = info.get("error")
        if err and err.get("err_code") == _ERR_STREAM_NOT_FOUND:
            info = await self._api(f"$JS.API.STREAM.CREATE.{self.stream}", self._stream_config())
            err = info.get("error")
            if err and err.get("err_code") == _ERR_STREAM_NAME_IN_USE:  # another node created it first
                info = await self._api(f"$JS.API.STREAM.INFO.{self.stream}")
                err = info.get("error")
        if err:
            raise LamaError(ErrorCode.INTERNAL, f"JetStream stream {self.stream}: {err.get('description')}",
                            stream=self.stream)
        config = info["config"]
        if config.get("subjects") != [self.subject_filter]:
            raise LamaError(ErrorCode.INTERNAL, f"stream {self.stream} exists with subjects {config.get('subjects')}, "
                            f"not [{self.subject_filter}]: not a lamabus registry", stream=self.stream)
        if not config.get("allow_atomic"):
            info = await self._api(f"$JS.API.STREAM.UPDATE.{self.stream}", {**config, "allow_atomic": True})
            if info.get("error"):
                raise LamaError(ErrorCode.INTERNAL, f"cannot enable atomic publish on {self.stream}: "
                                f"{info['error'].get('description')}", stream=self.stream)
        return info.get("state", {})

    async def _leader_last_seq(self) -> int:
        info = await self._api(f"$JS.API.STREAM.INFO.{self.stream}")
        if info.get("error"):
            raise LamaError(ErrorCode.INTERNAL, f"JetStream stream {self.stream}: {info['error'].get('description')}",
                            stream=self.stream)
        return int(info.get("state", {}).get("last_seq", 0))

    # -- the feed: an ordered push consumer that keeps the in-memory log

    @property
    def _applied(self) -> int:
        return self._base + len(self._rows)

    async def _feed(self) -> None:
        while not self._closed:
            queue: asyncio.Queue[Msg] = asyncio.Queue()
            nc = self._client()
            sub = None
            consumer = None
            try:
                inbox = nc.new_inbox()

                async def deliver(msg: Msg) -> None:
                    queue.put_nowait(msg)

                # Subscribed before the consumer exists, so its first delivery has somewhere to go.
                sub = await nc.subscribe(inbox, cb=deliver)
                consumer = await self._create_consumer(inbox)
                await self._pump(queue)
                self._feed_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a server gone, no leader yet: start over from what we applied
                self._feed_error = exc
                await anyio.sleep(0.1)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._drop_feed(nc, sub, consumer)

    async def _create_consumer(self, inbox: str) -> str:
        config = {
            "deliver_subject": inbox,
            "deliver_policy": "by_start_sequence",
            "opt_start_seq": self._applied + 1,
            "ack_policy": "none",
            "max_deliver": 1,
            "replay_policy": "instant",
            "filter_subject": self.subject_filter,
            "flow_control": True,
            "idle_heartbeat": int(self.heartbeat * 1e9),
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": int(max(10.0, self.heartbeat * 10) * 1e9),
        }
        resp = await self._api(f"$JS.API.CONSUMER.CREATE.{self.stream}", {"stream_name": self.stream, "config": config})
        if resp.get("error"):
            raise LamaError(ErrorCode.INTERNAL, f"feed consumer on {self.stream}: {resp['error'].get('description')}")
        return str(resp["name"])

    async def _drop_feed(self, nc: Client, sub: Any, consumer: str | None) -> None:
        # Best effort: an ephemeral consumer without interest goes away by itself after inactive_threshold.
        with contextlib.suppress(Exception):
            if sub is not None:
                await sub.unsubscribe()
        if consumer is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.request(f"$JS.API.CONSUMER.DELETE.{self.stream}.{consumer}", b"", timeout=1.0)

    async def _pump(self, queue: asyncio.Queue[Msg]) -> None:
        """Apply deliveries in order; return (to restart the consumer) on a gap or a stall."""
        stall = self.heartbeat * 3
        # Looked at on every delivery (heartbeats included), not only after a real event: nats-py and 3.11's
        # wait_for can swallow the cancel a close sends while the feed is still making its consumer, and a
        # pump fed by heartbeats would then run forever (CI hung 300 s on exactly that).
        while not self._closed:
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that meets a delivery.
                async with asyncio.timeout(stall):
                    msg = await queue.get()
            except TimeoutError:
                return  # not even a heartbeat: the consumer's server is gone
            headers = msg.headers or {}
            if headers.get("Status") == "100":
                if msg.reply:  # flow control: the server waits for this before sending more
                    await msg._client.publish(msg.reply)
                if stalled := headers.get("Nats-Consumer-Stalled"):
                    await msg._client.publish(stalled)
                if int(headers.get("Nats-Last-Stream", "0") or 0) > self._applied:
                    return  # the consumer moved past something we never got
                continue
            if headers.get("Status"):
                return
            seq, ts = _ack_seq_and_time(msg.reply)
            if seq <= self._applied:
                continue  # a restarted consumer repeating what we have
            if seq != self._applied + 1:
                return
            self._apply(msg, seq, ts)

    def _apply(self, msg: Msg, seq: int, ts_ns: int) -> None:
        headers = msg.headers or {}
        stream_id = decode_stream_id(msg.subject[len(self._subject_head):])
        stream = self._streams.setdefault(stream_id, [])
        # The fence makes the count of earlier messages on the subject the version we wrote in the header;
        # the count is what the log itself says, so it wins should a foreign writer have skipped the fence.
        row = StoredEvent(seq, stream_id, len(stream) + 1, headers.get(H_EVENT_ID) or f"nats-seq-{seq}",
                   headers.get(H_TYPE, ""), msg.data, ts_ns // 1_000_000)
        self._rows.append(row)
        stream.append(row)
        self._by_id.setdefault(row.event_id, row)
        self._notify()

    async def _sync(self) -> None:
        """Wait until the feed has applied everything the stream leader has committed by now."""
        self._check_open()
        if self._feed_task is None:
            raise LamaError(ErrorCode.INTERNAL, "event store is not open; use 'async with' or await open()")
        target = await self._leader_last_seq()
        try:
            with anyio.fail_after(self.timeout):
                while self._applied < target:
                    waiter = self._committed
                    self._check_open()
                    if self._applied >= target:
                        break
                    await waiter.wait()
        except TimeoutError:
            raise LamaError(ErrorCode.TIMEOUT, f"the registry feed did not reach position {target} within "
                            f"{self.timeout}s (last error: {self._feed_error!r})", position=target) from None
        self._check_open()

    # -- writing

    async def _append(self, prepared: list[_Prepared]) -> list[AppendResult]:
        total = sum(len(p.items) for p in prepared)
        if total > MAX_BATCH:
            raise LamaError(ErrorCode.BAD_REQUEST, f"{total} events in one append; JetStream commits at most "
                            f"{MAX_BATCH} atomically", events=total)
        deadline = time.monotonic() + self.timeout
        async with self._write_lock:
            # Where the log stood when we sent a batch whose commit we never heard about: if its ids turn up
            # after that point, the write was ours, not an earlier one's.
            unanswered_after: int | None = None
            while True:
                await self._sync()
                stored = {event_id: (r.stream_id, r.version, r.position, r.type)
                          for p in prepared for event_id, _, _ in p.items if (r := self._by_id.get(event_id))}
                dup = check_duplicates(prepared, stored)
                if dup is not None:
                    if unanswered_after is not None and self._all_after(stored, unanswered_after):
                        return [msgspec.structs.replace(r, duplicate=False) for r in dup]
                    return dup
                for p in prepared:
                    actual = len(self._streams.get(p.stream_id, ()))
                    if p.expected_version is not None and p.expected_version != actual:
                        raise stream_conflict(p.stream_id, p.expected_version, actual)
                sent_after = self._applied
                # Versions as of now: the feed may apply our own batch before its ack reaches us.
                base = {p.stream_id: len(self._streams.get(p.stream_id, ())) for p in prepared}
                outcome = await self._publish(self._messages(prepared))
                if outcome.error is None:
                    return self._results(prepared, base, outcome.last_seq - total + 1)
                err = outcome.error
                if err.get("err_code") == _ERR_BATCH_UNSUPPORTED_HEADER and self._msg_ids:
                    self._msg_ids = False
                    continue
                # A duplicate id is a fence too: one of ours is stored somewhere, and looking again says where.
                fenced = err.get("err_code") in (_ERR_WRONG_LAST_SEQUENCE, _ERR_WRONG_LAST_SEQUENCE_CONSTANT,
                                                 _ERR_BATCH_DUPLICATE_MSG_ID)
                transient = err.get("code") in (None, 408, 503) or err.get("err_code") == _ERR_BATCH_INCOMPLETE
                if not fenced and not transient:
                    raise LamaError(ErrorCode.INTERNAL, f"JetStream refused the append: {err.get('description')}",
                                    jetstream_error=err.get("err_code"))
                if err.get("code") is None and unanswered_after is None:
                    unanswered_after = sent_after
                if time.monotonic() >= deadline:
                    raise LamaError(ErrorCode.TIMEOUT, f"append not committed within {self.timeout}s",
                                    jetstream_error=err.get("description"))
                # Fenced: someone else committed to one of our streams; look again (a retry finds its ids).

    @staticmethod
    def _all_after(stored: dict[str, tuple[str, int, int, str]], position: int) -> bool:
        return all(pos > position for _, _, pos, _ in stored.values())

    def _messages(self, prepared: list[_Prepared]) -> list[tuple[str, bytes, dict[str, str]]]:
        out = []
        for p in prepared:
            stream = self._streams.get(p.stream_id, [])
            version = len(stream)
            last_seq = stream[-1].position if stream else 0
            for i, (event_id, etype, data) in enumerate(p.items):
                headers = {H_EVENT_ID: event_id, H_TYPE: etype, H_VERSION: str(version + i + 1)}
                if self._msg_ids:
                    headers[H_MSG_ID] = event_id
                if i == 0:
                    headers[H_EXPECTED_SUBJECT_SEQ] = str(last_seq)
                out.append((self.subject(p.stream_id), data, headers))
        return out

    @staticmethod
    def _results(prepared: list[_Prepared], base: dict[str, int], first_seq: int) -> list[AppendResult]:
        results, seq = [], first_seq
        for p in prepared:
            version = base[p.stream_id]
            n = len(p.items)
            results.append(AppendResult(p.stream_id, tuple(range(seq, seq + n)), version + n))
            seq += n
        return results

    async def _publish(self, messages: list[tuple[str, bytes, dict[str, str]]]) -> _Outcome:
        """Send one atomic batch; the commit's reply is the PubAck (or why nothing was stored)."""
        nc = self._client()
        batch_id = uuid.uuid4().hex
        try:
            for i, (subject, data, headers) in enumerate(messages, 1):
                headers = {**headers, H_BATCH_ID: batch_id, H_BATCH_SEQ: str(i)}
                if i < len(messages):
                    await nc.publish(subject, data, headers=headers)
                    continue
                headers[H_BATCH_COMMIT] = "1"
                reply = await nc.request(subject, data, timeout=self.request_timeout, headers=headers)
        except (nats.errors.TimeoutError, nats.errors.ConnectionReconnectingError):
            return _Outcome(error={"description": "no reply to the batch commit"})
        except nats.errors.NoRespondersError:
            return _Outcome(error={"code": 503, "description": "no stream leader"})
        except nats.errors.ConnectionClosedError:
            raise self._connection_closed() from None
        ack = json.loads(reply.data)
        if ack.get("error"):
            return _Outcome(error=ack["error"])
        if ack.get("count", 1) != len(messages):
            raise LamaError(ErrorCode.INTERNAL, f"JetStream stored {ack.get('count')} of {len(messages)} messages")
        return _Outcome(last_seq=int(ack["seq"]))

    # -- reading (each read first catches up with the stream leader)

    async def _read_stream(self, stream_id: str, from_version: int) -> list[StoredEvent]:
        await self._sync()
        rows = self._streams.get(stream_id, [])
        return rows[max(from_version, 1) - 1:]

    async def _read_all(self, after: int, limit: int | None) -> list[StoredEvent]:
        await self._sync()
        start = max(after - self._base, 0)
        rows = self._rows[start:] if limit is None else self._rows[start:start + limit]
        return list(rows)

    async def _last_position(self) -> int:
        await self._sync()
        return self._applied

    async def _stream_version(self, stream_id: str) -> int:
        await self._sync()
        return len(self._streams.get(stream_id, ()))


def _ack_seq_and_time(reply: str | None) -> tuple[int, int]:
    """Stream sequence and timestamp (ns) from a JetStream delivery's reply subject, with or without a domain:
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` or the same after
    ``<domain>.<account hash>`` (and a trailing token)."""
    tokens = (reply or "").split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise LamaError(ErrorCode.INTERNAL, f"not a JetStream delivery: {reply!r}")
    base = 2 if len(tokens) == 9 else 4
    return int(tokens[base + 3]), int(tokens[base + 5])
