"""Several lamabus nodes on one NATS cluster (``--registry nats``; DESIGN.md "Growing past one node").

What JetStream does, and what lamabus adds (no consensus of its own):

* **Partitions.** The work stream (``LAMA_WORK`` for the default prefix) sources
  the chat messages of ``LAMA_TOPICS`` through a subject transform,
  ``<prefix>.topic.*.msg`` -> ``<prefix>.work.{{partition(N,1)}}.<topic>``: the
  broker hashes each topic id (FNV-1a 32 bit, mod N: :func:`partition_of` is the
  same function) into one of N partitions, keeps the messages of one topic in
  posting order, and keeps ``LAMA_TOPICS`` itself as it is (replay, the page and
  every client read it unchanged). The work stream has work-queue retention: it
  holds exactly the messages not yet acknowledged, and one durable pull consumer
  per partition (``lamabus-p<k>``) delivers them.
* **Ownership.** A key-value bucket (``lamabus_cluster``) holds ``node.<id>``
  (each node's heartbeat) and ``part.<k>`` (the lease on partition k), both
  expiring ``lease_ttl`` seconds after their last write. Every node computes the
  same wanted owner of each partition from the live nodes (rendezvous hashing: a
  node that joins takes about 1/n of the partitions, the others keep theirs and
  their KV caches), takes a lease with a create-if-absent write, renews it with
  an expected-revision write, and gives back (finishes what it holds of the
  partition, then deletes the lease) what is wanted elsewhere. Only the lease
  holder pulls from a partition, so each topic is answered by one node at a
  time, in order.
* **Takeover.** A new owner deletes and recreates the partition's consumer:
  every message still in the work queue (those a dead owner held unacknowledged
  included) is delivered again at once, in stream order, instead of after
  ``ack_wait``. Messages delivered again this way are marked redelivered, so a
  reply the dead node recorded but never published is published now (the
  broker drops a second copy by its id; the registry refuses a second record).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from typing import Any, Callable

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskGroup
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from bus.config import Settings
from bus.node.intake import JetStreamDelivery, StreamLimits, Submit, TopicIntake, ensure_topics_stream
from bus.subjects import Subjects
from handlers.registry import Registry
from storage.jetstream import JetStreamEventStore

log = logging.getLogger("lamabus.cluster")

_FNV_OFFSET, _FNV_PRIME = 0x811C9DC5, 0x01000193


def partition_of(topic: str, partitions: int) -> int:
    """The partition the broker's ``{{partition(n,1)}}`` puts ``topic`` in (FNV-1a 32 of the token, mod n)."""
    h = _FNV_OFFSET
    for b in topic.encode():
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFF
    return h % partitions


def cluster_size(nc: Client) -> int:
    """How many servers the broker says its cluster has (the connect INFO's ``connect_urls``); 1 when none."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    if not info.get("cluster"):
        return 1
    return max(1, len(info.get("connect_urls") or ()))


def replicas_for(settings: Settings, nc: Client) -> int:
    return settings.replicas if settings.replicas is not None else min(3, cluster_size(nc))


def open_registry(settings: Settings, nc: Client, *, replicas: int) -> Registry:
    """The service's registry: its own SQLite file, or (``registry = "nats"``) the JetStream event store on
    the service's connection, shared by every node of the cluster."""
    dirs = [settings.models_dir, *settings.model_dirs]
    if settings.registry == "sqlite":
        return Registry.open(settings.registry_path, dirs, history_turns=settings.history_cache_turns)
    store = JetStreamEventStore(nc, prefix=settings.prefix, replicas=replicas)
    return Registry(store, dirs, owns_store=True, history_turns=settings.history_cache_turns)


def work_stream_name(subjects: Subjects) -> str:
    return subjects.stream_name.replace("LAMA_TOPICS", "LAMA_WORK", 1)


def bucket_name(subjects: Subjects) -> str:
    suffix = subjects.stream_name[len("LAMA_TOPICS"):]
    return f"lamabus_cluster{suffix}"


def consumer_name(partition: int) -> str:
    return f"lamabus-p{partition}"


def _score(node: str, partition: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{node}/{partition}".encode()).digest()[:8], "big")


def wanted_owner(partition: int, nodes: set[str] | list[str]) -> str:
    """Rendezvous hashing: the same answer on every node that sees the same members."""
    return max(nodes, key=lambda n: (_score(n, partition), n))


def owners_among(live: set[str], lacking: set[str]) -> set[str]:
    """The nodes that share the partitions: the live ones that have every live model's file. A node that
    lacks one would take topics it cannot answer (model_file_missing), so it takes none while another
    node can; when every live node lacks a file, all of them share the work and say so per message."""
    return (live - lacking) or live


class _Api:
    """JetStream API requests by hand (nats-py 2.16 has no subject_transforms on a stream source)."""

    def __init__(self, nc: Client, timeout: float = 30.0) -> None:
        self.nc = nc
        self.timeout = timeout

    async def __call__(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        payload = json.dumps(body).encode() if body is not None else b""
        while True:
            try:
                resp = json.loads((await self.nc.request(subject, payload, timeout=5)).data)
                if (resp.get("error") or {}).get("code") != 503:
                    return resp
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError):
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"JetStream did not answer {subject} within {self.timeout}s")
            await anyio.sleep(0.2)  # no leader yet: ask again


async def ensure_work_stream(api: _Api, subjects: Subjects, *, partitions: int, replicas: int,
                             limits: StreamLimits) -> None:
    name = work_stream_name(subjects)
    transform = {"src": subjects.all_msg,
                 "dest": f"{subjects.prefix}.work.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"}
    info = await api(f"$JS.API.STREAM.INFO.{name}")
    if info.get("error") is None:
        sources = info["config"].get("sources") or []
        have = [t for s in sources for t in s.get("subject_transforms") or ()]
        if have != [transform]:
            raise RuntimeError(f"stream {name} partitions topics as {have}, not into {partitions} partitions; "
                               f"the partition count is fixed once chosen (delete {name} to change it)")
        return
    # Source from now on: messages stored before the cluster existed were the single node's to answer.
    topics = await api(f"$JS.API.STREAM.INFO.{subjects.stream_name}")
    start = int(topics.get("state", {}).get("last_seq", 0)) + 1
    config = {
        "name": name,
        "description": f"lamabus: chat messages not yet answered, in {partitions} partitions by topic",
        "retention": "workqueue", "storage": "file", "discard": "old", "num_replicas": replicas,
        "max_age": int((limits.max_age or limits.default_max_age) * 1e9),
        "sources": [{"name": subjects.stream_name, "opt_start_seq": start, "subject_transforms": [transform]}],
        "metadata": {"lamabus.partitions": str(partitions)},
    }
    created = await api(f"$JS.API.STREAM.CREATE.{name}", config)
    err = created.get("error")
    if err and err.get("err_code") != 10058:  # 10058: another node created it first
        raise RuntimeError(f"cannot create stream {name}: {err.get('description')}")


class _PartitionDelivery(JetStreamDelivery):
    def __init__(self, msg: Msg, on_settled: Any, redelivered: bool) -> None:
        super().__init__(msg, on_settled)
        self._maybe_seen = redelivered

    @property
    def redelivered(self) -> bool:
        # A consumer recreated at takeover counts deliveries from 1 again; what the previous owner may have
        # seen is marked here, so a reply it recorded and did not publish is published.
        return self._maybe_seen or super().redelivered


@dataclasses.dataclass
class _Held:
    revision: int
    renewed: float
    scope: anyio.CancelScope | None = None
    in_flight: int = 0
    drained: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    releasing: bool = False


class PartitionedIntake(TopicIntake):
    """The intake of one node of a cluster: pulls only from the partitions whose lease it holds."""

    def __init__(self, nc: Client, subjects: Subjects, submit: Submit, *, node_id: str, partitions: int,
                 replicas: int, lease_ttl: float, ack_wait: float, duplicate_window: float, window: int = 64,
                 batch: int = 32, limits: StreamLimits | None = None, release_timeout: float = 30.0,
                 on_partition_left: Callable[[int], None] = lambda _p: None,
                 answerable: Callable[[], bool] = lambda: True) -> None:
        super().__init__(nc, subjects, submit, ack_wait=ack_wait, duplicate_window=duplicate_window, window=window,
                         batch=batch, limits=limits)
        self.node_id = node_id
        self.partitions = partitions
        self.replicas = replicas
        self.lease_ttl = lease_ttl
        self.tick = max(0.2, lease_ttl / 5)
        self.release_timeout = release_timeout
        #: Told when this node stops pulling from a partition (given back, or lost).
        self.on_partition_left = on_partition_left
        #: Whether this node has every live model's file now (looked at every tick).
        self.answerable = answerable
        self.lacking: set[str] = set()
        self._said_lacking = False
        self.stream = work_stream_name(subjects)
        #: The nodes that share the partitions (the live ones with every model file; see owners_among).
        self.members: set[str] = {node_id}
        #: Every node with a heartbeat in the bucket, this one included.
        self.live: set[str] = {node_id}
        self.takeovers = 0
        self._held: dict[int, _Held] = {}
        self._kv: KeyValue | None = None
        self._api = _Api(nc)
        self._tg: TaskGroup | None = None
        self._work_head = f"{subjects.prefix}.work."

    # -- what the rest of the service asks

    @property
    def owned(self) -> list[int]:
        return sorted(p for p, h in self._held.items() if not h.releasing)

    def owns_topic(self, topic: str) -> bool:
        return partition_of(topic, self.partitions) in self.owned

    def node_diagnostics(self) -> dict[str, Any]:
        return {"nodeId": self.node_id, "partitions": self.owned, "partitionCount": self.partitions,
                "members": sorted(self.members), "lackingModelFiles": sorted(self.lacking),
                "replicas": self.replicas, "takeovers": self.takeovers, "leaseTtl": self.lease_ttl}

    async def waiting_in_stream(self) -> int | None:
        total = 0
        try:
            for p in self.owned:
                total += (await self.js.consumer_info(self.stream, consumer_name(p))).num_pending
        except Exception:
            return None
        return total

    # -- running

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        limits = self.limits or StreamLimits()
        await ensure_topics_stream(self.js, self.subjects, duplicate_window=self.duplicate_window, limits=limits,
                                   replicas=self.replicas)
        await ensure_work_stream(self._api, self.subjects, partitions=self.partitions, replicas=self.replicas,
                                 limits=limits)
        self._kv = await self._bucket()
        try:
            async with self.answering_wildcard_topics(), anyio.create_task_group() as tg:
                self._tg = tg
                await self._coordinate_once()
                task_status.started()
                while True:
                    await anyio.sleep(self.tick)
                    try:
                        await self._coordinate_once()
                    except Exception as exc:  # the broker away: the leases run on their TTL; try again
                        log.warning("partition coordination failed (%s)", exc)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                await self._leave()

    async def _bucket(self) -> KeyValue:
        name = bucket_name(self.subjects)
        try:
            kv = await self.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            try:
                kv = await self.js.create_key_value(KeyValueConfig(
                    bucket=name, description="lamabus nodes and partition leases", history=1, ttl=self.lease_ttl,
                    storage=StorageType.FILE, replicas=self.replicas))
            except nats.js.errors.BadRequestError:  # created by another node in between
                kv = await self.js.key_value(name)
        status = await kv.status()
        if status.ttl and abs(status.ttl - self.lease_ttl) > 0.01:
            log.warning("bucket %s expires keys after %.1fs, not lease_ttl %.1fs (the bucket's wins)",
                        name, status.ttl, self.lease_ttl)
            self.lease_ttl = status.ttl
            self.tick = max(0.2, self.lease_ttl / 5)
        return kv

    async def _live_nodes(self) -> set[str]:
        """The nodes that share the partitions (:func:`owners_among`); ``lacking`` is updated on the way."""
        assert self._kv is not None
        try:
            keys = await self._kv.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        live = {k[len("node."):] for k in keys if k.startswith("node.")} | {self.node_id}
        self.live = live
        self.lacking = {k[len("lacks."):] for k in keys if k.startswith("lacks.")} & live
        return owners_among(live, self.lacking)

    async def _say_what_we_lack(self, kv: KeyValue) -> None:
        """``lacks.<node>`` while this node lacks a live model's file (it expires with the node)."""
        try:
            lacking = not self.answerable()
        except Exception:  # a registry that cannot say now: keep what was said
            lacking = self._said_lacking
        if lacking:
            if not self._said_lacking:
                log.warning("node %s lacks a registered model's file: it takes no topics while another node "
                            "has them all", self.node_id)
            await kv.put(f"lacks.{self.node_id}", b"model files")
        elif self._said_lacking:
            await kv.delete(f"lacks.{self.node_id}")
            log.info("node %s has every model file again: it takes its share of the topics", self.node_id)
        self._said_lacking = lacking

    async def _coordinate_once(self) -> None:
        kv = self._kv
        assert kv is not None and self._tg is not None
        await kv.put(f"node.{self.node_id}", json.dumps({"at": time.time()}).encode())
        await self._say_what_we_lack(kv)
        self.members = await self._live_nodes()
        now = time.monotonic()
        for p in range(self.partitions):
            want = wanted_owner(p, self.members) == self.node_id
            held = self._held.get(p)
            if held is not None:
                if held.releasing:  # finishing what it holds before giving it back: keep the lease till then
                    with contextlib.suppress(Exception):
                        held.revision = await kv.update(f"part.{p}", self.node_id.encode(), last=held.revision)
                    continue
                if not want:
                    held.releasing = True
                    self._tg.start_soon(self._release, p, held)
                    continue
                await self._renew(p, held, now)
            elif want:
                try:
                    revision = await kv.create(f"part.{p}", self.node_id.encode())
                except nats.js.errors.KeyWrongLastSequenceError:
                    revision = await self._reclaim(p)
                    if revision is None:
                        continue  # held by another node: it gives it back, or its lease expires
                held = self._held[p] = _Held(revision=revision, renewed=now)
                self._tg.start_soon(self._consume, p, held)

    async def _reclaim(self, p: int) -> int | None:
        """A lease still held in our name: an earlier run of this node (killed, restarted at once) took it.
        Take it over now rather than after it expires."""
        assert self._kv is not None
        try:
            entry = await self._kv.get(f"part.{p}")
            if entry.value != self.node_id.encode() or entry.revision is None:
                return None
            return await self._kv.update(f"part.{p}", self.node_id.encode(), last=entry.revision)
        except Exception:
            return None

    async def _renew(self, p: int, held: _Held, now: float) -> None:
        assert self._kv is not None
        try:
            held.revision = await self._kv.update(f"part.{p}", self.node_id.encode(), last=held.revision)
            held.renewed = now
            return
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        except Exception as exc:
            if now - held.renewed < self.lease_ttl * 0.8:
                log.warning("could not renew the lease on partition %d (%s); trying again", p, exc)
                return
            log.warning("the lease on partition %d could not be renewed for %.1fs; stopping it", p, now - held.renewed)
            self._drop(p, held)
            return
        # The lease expired under us. If nobody took it, take it again (nothing changed hands); else stop.
        try:
            held.revision = await self._kv.create(f"part.{p}", self.node_id.encode())
            held.renewed = now
        except Exception:
            log.warning("partition %d was taken over by another node; stopping it", p)
            self._drop(p, held)

    def _drop(self, p: int, held: _Held) -> None:
        held.releasing = True
        if self._held.get(p) is held:
            del self._held[p]
        if held.scope is not None:
            held.scope.cancel()
        self.on_partition_left(p)

    async def _release(self, p: int, held: _Held) -> None:
        """Give partition ``p`` to the node that now wants it: stop pulling, finish what we hold, delete the lease."""
        if held.scope is not None:
            held.scope.cancel()
        with anyio.move_on_after(self.release_timeout):
            while held.in_flight > 0:
                held.drained = anyio.Event()
                await held.drained.wait()
        assert self._kv is not None
        if self._held.get(p) is held:
            del self._held[p]  # renewed no more
        self.on_partition_left(p)
        for _ in range(3):  # a renewal in flight may have moved the revision on
            try:
                await self._kv.delete(f"part.{p}", last=held.revision)
                break
            except nats.js.errors.KeyWrongLastSequenceError:
                with contextlib.suppress(Exception):
                    entry = await self._kv.get(f"part.{p}")
                    if entry.value != self.node_id.encode() or entry.revision is None:
                        break
                    held.revision = entry.revision
            except Exception:
                break  # it expires by itself
        log.info("node %s gave partition %d back", self.node_id, p)

    async def _leave(self) -> None:
        """On a clean stop: delete our leases and our heartbeat, so the others take over at once."""
        kv = self._kv
        if kv is None:
            return
        for p, held in list(self._held.items()):
            with contextlib.suppress(Exception):
                await kv.delete(f"part.{p}", last=held.revision)
        self._held.clear()
        with contextlib.suppress(Exception):
            await kv.delete(f"node.{self.node_id}")
        if self._said_lacking:
            with contextlib.suppress(Exception):
                await kv.delete(f"lacks.{self.node_id}")

    # -- pulling one partition

    async def _takeover(self, p: int) -> int:
        """Recreate the partition's consumer; return the work stream's last sequence at that moment: anything up
        to it may have been taken by a previous owner."""
        name = consumer_name(p)
        await self._api(f"$JS.API.CONSUMER.DELETE.{self.stream}.{name}")
        info = await self._api(f"$JS.API.STREAM.INFO.{self.stream}")
        last = int(info.get("state", {}).get("last_seq", 0))
        await self._create_consumer(p)
        return last

    async def _create_consumer(self, p: int) -> None:
        name = consumer_name(p)
        config = {"durable_name": name, "deliver_policy": "all", "ack_policy": "explicit",
                  "ack_wait": int(self.ack_wait * 1e9), "max_ack_pending": self.window, "max_deliver": -1,
                  "filter_subject": f"{self._work_head}{p}.*"}
        resp = await self._api(f"$JS.API.CONSUMER.CREATE.{self.stream}.{name}",
                               {"stream_name": self.stream, "config": config, "action": ""})
        if resp.get("error"):
            raise RuntimeError(f"consumer {name} on {self.stream}: {resp['error'].get('description')}")

    async def _consume(self, p: int, held: _Held) -> None:
        with anyio.CancelScope() as scope:
            held.scope = scope
            if self._held.get(p) is not held or held.releasing:
                return  # lost or given back before this task started
            try:
                seen_up_to = await self._takeover(p)
            except Exception as exc:
                log.warning("could not take partition %d over (%s); giving it back", p, exc)
                self._drop(p, held)
                with contextlib.suppress(Exception):
                    assert self._kv is not None
                    await self._kv.delete(f"part.{p}", last=held.revision)
                return
            self.takeovers += 1
            log.info("node %s owns partition %d", self.node_id, p)
            psub = None
            try:
                while True:
                    if psub is None:
                        try:
                            psub = await self.js.pull_subscribe_bind(consumer_name(p), stream=self.stream)
                        except Exception as exc:
                            log.warning("binding partition %d failed (%s)", p, exc)
                            await anyio.sleep(0.5)
                            continue
                    n = await self._reserve()
                    msgs = []
                    try:
                        msgs = await psub.fetch(n, timeout=2)
                    except (NatsTimeoutError, TimeoutError):
                        pass
                    except Exception as exc:
                        log.warning("fetch on partition %d failed (%s); binding again", p, exc)
                        await self._rebind_partition(p, psub)
                        psub = None
                        await anyio.sleep(0.5)
                        continue
                    finally:  # also when the partition is given back in the middle of a fetch
                        self._unreserve(n - len(msgs))
                    for msg in msgs:
                        self.taken += 1
                        held.in_flight += 1
                        await self._take(self._as_topic_msg(msg, p, held, seen_up_to))
            finally:
                with anyio.CancelScope(shield=True):
                    if psub is not None:
                        with contextlib.suppress(Exception):
                            await psub.unsubscribe()

    async def _rebind_partition(self, p: int, psub: Any) -> None:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
        # A broker that came back with an empty store lost the consumer: the lease holder (us) makes it again.
        info = await self._api(f"$JS.API.CONSUMER.INFO.{self.stream}.{consumer_name(p)}")
        if (info.get("error") or {}).get("err_code") == 10014 and p in self.owned:
            with contextlib.suppress(Exception):
                await ensure_work_stream(self._api, self.subjects, partitions=self.partitions,
                                         replicas=self.replicas, limits=self.limits or StreamLimits())
                await self._create_consumer(p)

    async def _reserve(self) -> int:
        """Places in the window for one fetch. Several partitions wait here at once: they share one event,
        replaced only once it has fired. Each fetch asks for a share of the window, so that a partition
        whose fetch waits for messages does not hold the room the others need."""
        while self.in_flight >= self.window:
            if self._room.is_set():
                self._room = anyio.Event()
            await self._room.wait()
        share = max(1, self.window // max(1, len(self._held)))
        n = min(self.batch, share, self.window - self.in_flight)
        self.in_flight += n
        return n

    def _unreserve(self, n: int) -> None:
        if n:
            self.in_flight -= n
            self._room.set()

    def _as_topic_msg(self, msg: Msg, p: int, held: _Held, seen_up_to: int) -> Msg:
        token = msg.subject[len(self._work_head):].split(".", 1)[-1]
        topic_msg = dataclasses.replace(msg, subject=self.subjects.raw_topic_subject(token, "msg"))
        topic_msg._partition = (p, held, msg.metadata.sequence.stream <= seen_up_to)  # type: ignore[attr-defined]
        return topic_msg

    def _delivery(self, msg: Msg) -> JetStreamDelivery:
        p, held, maybe_seen = getattr(msg, "_partition")

        def settled() -> None:
            held.in_flight -= 1
            if held.in_flight <= 0:
                held.drained.set()
            self._settled()

        return _PartitionDelivery(msg, settled, maybe_seen)


def node_settings_summary(settings: Settings, node_id: str, replicas: int) -> str:
    return msgspec.json.encode({"node": node_id, "registry": settings.registry, "partitions": settings.partitions,
                                "replicas": replicas, "leaseTtl": settings.lease_ttl}).decode()
