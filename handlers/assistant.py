"""The assistant: every chat message in a topic gets exactly one streamed reply.

The seed's AIAssistantModel answered "the last message" of a topic and kept its
topic map in memory. Here each accepted message is a job in its topic's lane:
a topic's messages are answered in order, one at a time; different topics run
concurrently up to a limit; each model has a bounded queue. A message is
acknowledged to the transport only after its reply is recorded and published,
and a message already answered is never answered again.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal, Protocol

import anyio
import msgspec
from anyio.abc import TaskGroup

from engine.types import ChatTurn, GenerateRequest, GenerationResult, TokenChunk
from handlers.ports import Directory, HandBack, ModelRef, Publisher, RecordedReply, Runtime
from handlers.quotas import QuotaRefused, Quotas, Ticket
from wire.errors import ErrorCode, LamaError
from wire.messages import (
    CancelReply,
    ChatMessage,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    GenerationToken,
)
from wire.params import SamplingParams

log = logging.getLogger("lamabus.assistant")

_REPLY_NAMESPACE = uuid.UUID("5b0c2f0e-6c1d-4a53-9d6e-6c616d616275")


def reply_id_for(topic: str, message_id: str) -> str:
    """The reply's id is a function of the message it answers, so a retried answer
    carries the same id and the broker's de-duplication drops the second copy."""
    return str(uuid.uuid5(_REPLY_NAMESPACE, f"{topic}/{message_id}"))


def completed_dedup_id(reply_id: str) -> str:
    """The broker de-duplication id of a reply's generation.completed; a re-published copy must carry the same."""
    return f"{reply_id}.completed"


class Delivery(Protocol):
    """The transport's handle on one consumed message."""

    @property
    def redelivered(self) -> bool: ...

    async def ack(self) -> None: ...

    async def in_progress(self) -> None: ...

    async def retry_later(self) -> None:
        """Hand the message back to the transport to be delivered again soon; never raises."""


class Background(Protocol):
    """Low-priority work on the models the assistant uses (topic analysis): told when users' messages
    come and go, so that it runs only while a model has none and yields the moment one comes."""

    def user_waiting(self, model_id: str) -> None:
        """A user's message for ``model_id`` was accepted: let go of the model now."""

    def user_done(self, model_id: str) -> None:
        """A user's message for ``model_id`` is settled (answered, failed, cancelled, handed back)."""

    def replied(self, topic: str, model_id: str, reply_id: str) -> None:
        """A reply in ``topic`` was recorded and published."""


class AssistantSettings(msgspec.Struct, frozen=True, kw_only=True):
    max_concurrent_topics: int = 8
    max_queue_per_model: int = 64
    on_new_message: Literal["queue", "interrupt"] = "queue"
    system_prompt: str = "You are a helpful assistant."
    #: Seconds between "still working" acks for every accepted, unfinished message.
    progress_interval: float = 10.0
    #: This node's name, carried as ``nodeId`` by every generation event (several nodes on one cluster).
    node_id: str | None = None


@dataclass(eq=False)
class _Job:
    message: ChatMessage
    model: ModelRef
    delivery: Delivery
    accepted_at: float
    sampling: SamplingParams
    #: Requests ahead of this one for its model when it was accepted (generation.started's queuePosition).
    ahead: int = 0
    #: generation.started is out. A constrained message's is held back until its grammar compiled, so
    #: that a bad grammar is answered with generation.failed alone.
    announced: bool = False
    cancelled: bool = False
    #: The engine has finished; a cancel from here on cannot stop the reply.
    finishing: bool = False
    #: The author's running place (handlers/quotas.py), released when the job is settled.
    ticket: Ticket | None = None


@dataclass(eq=False)
class _Lane:
    jobs: collections.deque[_Job] = field(default_factory=collections.deque)
    current: _Job | None = None


class _Redelivered:
    """A delivery seen as redelivered, so that a reply recorded elsewhere is published by us."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    @property
    def redelivered(self) -> bool:
        return True

    async def ack(self) -> None:
        await self._delivery.ack()

    async def in_progress(self) -> None:
        await self._delivery.in_progress()

    async def retry_later(self) -> None:
        await self._delivery.retry_later()


def _now_ms() -> float:
    return time.time() * 1000.0


class Assistant:
    """Owns the topic lanes. Use as an async context manager; ``submit`` each consumed message."""

    def __init__(self, directory: Directory, runtime: Runtime, publisher: Publisher,
                 settings: AssistantSettings | None = None, *, background: Background | None = None,
                 quotas: Quotas | None = None) -> None:
        """``quotas``: the service's per-author limits (shared with the llm API); None: no limits."""
        self.directory = directory
        self.runtime = runtime
        self.publisher = publisher
        self.settings = settings or AssistantSettings()
        self.background = background
        self.quotas = quotas
        self._lanes: dict[str, _Lane] = {}
        self._queued: collections.Counter[str] = collections.Counter()
        self._limiter = anyio.CapacityLimiter(self.settings.max_concurrent_topics)
        self._tg: TaskGroup | None = None
        self.counters: collections.Counter[str] = collections.Counter()

    async def __aenter__(self) -> "Assistant":
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._keep_deliveries_alive)
        return self

    async def __aexit__(self, *exc_info: object) -> bool | None:
        tg, self._tg = self._tg, None
        if tg is None:
            return None
        tg.cancel_scope.cancel()
        return await tg.__aexit__(*exc_info)

    # -- intake ---------------------------------------------------------------

    async def submit(self, message: ChatMessage, delivery: Delivery) -> None:
        """Accept one consumed message. Returns once it is queued (or answered at once)."""
        if self._tg is None:
            raise RuntimeError("Assistant used outside its context")
        topic = message.topic
        if self.directory.is_ai(message.author_id):
            # Never answer an AI, our own replies included: two assistants would talk forever.
            self.counters["ignored_ai"] += 1
            await delivery.ack()
            return
        recorded = await self.directory.recorded_reply(topic, message.id)
        if recorded is not None:
            await self._settle_duplicate(recorded, delivery)
            return
        ticket: Ticket | None = None
        if self.quotas is not None:
            try:
                # A message id is unique within its topic: the quotas know a message by both.
                ticket = self.quotas.admit(
                    message.author_id, f"{topic}/{message.id}", prompt_chars=len(message.text),
                    asked_max_tokens=message.params.max_tokens if message.params is not None else None,
                    path="topic", redelivered=delivery.redelivered)
            except QuotaRefused as exc:
                await self._fail(message, exc, delivery, dedup_id=exc.dedup_id)
                return
        queued = False
        try:
            queued = await self._queue(message, delivery, ticket)
        finally:
            if not queued and ticket is not None:
                ticket.release()  # answered (or failed) before it was queued: it holds nothing

    async def _queue(self, message: ChatMessage, delivery: Delivery, ticket: Ticket | None) -> bool:
        """Queue an admitted message in its topic's lane (True), or answer it at once (False)."""
        assert self._tg is not None
        topic = message.topic
        try:
            model = await self.directory.resolve_model(topic, message.model_id)
        except LamaError as exc:
            await self._fail(message, exc, delivery)
            return False
        if self.settings.node_id is not None and not os.path.isfile(model.config.model_path):
            # A node of a cluster: the registry is shared, files are per node (a shared volume, or a
            # pull on each node), and this one lacks the file. Said before anything is queued.
            node = self.settings.node_id
            await self._fail(message, LamaError(
                ErrorCode.MODEL_FILE_MISSING,
                f"model {model.model_id}: file {model.config.model_path} is not on node {node or 'this node'}",
                model_id=model.model_id, path=model.config.model_path, node_id=node), delivery)
            return False
        ahead = self._queued[model.model_id]
        if ahead >= self.settings.max_queue_per_model:
            # Only reached when the intake's window is set above this bound. Nothing is recorded,
            # so the same message id is answered when it comes again under a new Nats-Msg-Id.
            await self._fail(message, LamaError(
                ErrorCode.BUSY, f"model {model.model_id} has {ahead} requests waiting; try again later "
                f"(re-publish with a new Nats-Msg-Id header, e.g. {message.id}.retry1)",
                model_id=model.model_id, queued=ahead, retryable=True), delivery)
            return False
        sampling = SamplingParams.resolve(message.params, model.params)
        if self.quotas is not None:  # the cap, on whatever layer set maxTokens (a refusal was decided above)
            sampling = msgspec.structs.replace(sampling, max_tokens=self.quotas.cap(sampling.max_tokens, "topic"))
        self._enqueued(model.model_id)
        job = _Job(message, model, delivery, accepted_at=_now_ms(), sampling=sampling, ahead=ahead, ticket=ticket)
        try:
            if sampling.grammar is None and sampling.json_schema is None:
                await self._announce(job)
        except BaseException:
            self._dequeued(model.model_id)  # not queued after all: the transport redelivers it
            raise
        lane = self._lanes.get(topic)
        if lane is None:
            lane = self._lanes[topic] = _Lane()
            lane.jobs.append(job)
            self._tg.start_soon(self._run_lane, topic, lane)
        else:
            lane.jobs.append(job)
            if self.settings.on_new_message == "interrupt" and lane.current is not None:
                await self.runtime.cancel(lane.current.message.id)
        return True

    def _enqueued(self, model_id: str) -> None:
        self._queued[model_id] += 1
        if self.background is not None:
            self.background.user_waiting(model_id)

    def _dequeued(self, model_id: str) -> None:
        self._queued[model_id] -= 1
        if self.background is not None:
            self.background.user_done(model_id)

    async def _announce(self, job: _Job) -> None:
        message, model = job.message, job.model
        job.announced = True
        await self.publisher.event(
            GenerationStarted(request_id=message.id, topic=message.topic, author_id=model.person_id,
                              model_id=model.model_id, queue_position=job.ahead, node_id=self.settings.node_id),
            dedup_id=f"{message.id}.started.{message.topic}", wait=False)

    async def _settle_duplicate(self, recorded: RecordedReply, delivery: Delivery) -> None:
        self.counters["duplicates"] += 1
        if delivery.redelivered and recorded.reply is not None:
            # We may have died between recording the reply and publishing it; publishing
            # again is safe because the broker drops a second copy with the same id.
            await self.publisher.message(recorded.reply)
            if recorded.completed is not None:
                completed = recorded.completed
                if completed.node_id is None:
                    completed = msgspec.structs.replace(completed, node_id=self.settings.node_id)
                await self.publisher.event(completed, dedup_id=completed_dedup_id(recorded.reply.id))
        await delivery.ack()

    # -- lanes ----------------------------------------------------------------

    async def _run_lane(self, topic: str, lane: _Lane) -> None:
        try:
            while lane.jobs:
                job = lane.jobs.popleft()
                lane.current = job
                try:
                    await self._answer(job)
                except HandBack as exc:
                    log.info("%s in %s handed back: %s", job.message.id, topic, exc)
                    await job.delivery.retry_later()
                except Exception:
                    # Recording or publishing failed (the broker away, ...): hand the message back,
                    # so it is delivered again and answered then (a recorded reply is re-published
                    # with its id). The lane and the service go on.
                    self.counters["errors"] += 1
                    log.exception("answering %s in %s failed; handed back for redelivery", job.message.id, topic)
                    await job.delivery.retry_later()
                finally:
                    lane.current = None
                    self._dequeued(job.model.model_id)
                    if job.ticket is not None:
                        job.ticket.release()
        finally:
            if self._lanes.get(topic) is lane:
                del self._lanes[topic]

    async def _answer(self, job: _Job) -> None:
        message = job.message
        recorded = await self.directory.recorded_reply(message.topic, message.id)
        if recorded is not None:
            await self._settle_duplicate(recorded, job.delivery)
            return
        if job.cancelled:
            await self._cancelled(job, text="", tokens=0)
            return
        if not job.announced:
            try:
                await self.runtime.check(job.model, job.sampling)
            except LamaError as exc:
                await self._fail(message, exc, job.delivery)
                return
            except Exception as exc:  # the boundary, as for the generation below
                log.exception("checking the grammar of %s in %s failed", message.id, message.topic)
                await self._fail(message, LamaError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"), job.delivery)
                return
            if job.cancelled:
                await self._cancelled(job, text="", tokens=0)
                return
            await self._announce(job)
        try:
            async with self._limiter:
                result = await self._generate(job)
        except LamaError as exc:
            if job.cancelled:  # e.g. the model failed to load after the person had given up waiting
                await self._cancelled(job, text="", tokens=0)
                return
            await self._fail(message, exc, job.delivery)
            return
        except Exception as exc:  # the boundary: one bad job never kills the lane
            log.exception("generation for %s in %s failed", message.id, message.topic)
            await self._fail(message, LamaError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"), job.delivery)
            return
        if result is None:  # cancelled before the engine took it
            await self._cancelled(job, text="", tokens=0)
            return
        if result.cancelled or job.cancelled:
            await self._cancelled(job, text=result.text, tokens=result.tokens)
            return
        model = job.model
        reply = ChatMessage(id=reply_id_for(message.topic, message.id), topic=message.topic,
                            author_id=model.person_id, text=result.text, sent_at=datetime.now(timezone.utc),
                            reply_to=message.id, model_id=model.model_id)
        completed = GenerationCompleted(
            request_id=message.id, message_id=reply.id, topic=message.topic, author_id=model.person_id,
            model_id=model.model_id, text=result.text, thinking=result.thinking, tokens=result.tokens,
            finish_reason=result.finish_reason,  # type: ignore[arg-type]  # cancelled handled above
            timing=result.timing, usage=result.usage, node_id=self.settings.node_id)
        await self.directory.record_reply(message, reply, completed)
        recorded = await self.directory.recorded_reply(message.topic, message.id)
        if recorded is not None and recorded.reply is not None and recorded.reply.text != reply.text:
            # Another node (one that took this topic over while we were slow) recorded its answer first:
            # that one is the reply; publish it, under the same id, rather than ours.
            await self._settle_duplicate(recorded, _Redelivered(job.delivery))
            return
        await self.publisher.message(reply)
        await self.publisher.event(completed, dedup_id=completed_dedup_id(reply.id))
        await job.delivery.ack()
        self.counters["answered"] += 1
        if self.background is not None:
            self.background.replied(message.topic, model.model_id, reply.id)

    async def _generate(self, job: _Job) -> GenerationResult | None:
        """The engine's result, or None when the job was cancelled before the engine took it.

        A cancel can come at any point: while the job waits for a topic slot, while the
        history is read, while the model loads (the engine does not know the request yet,
        so ``runtime.cancel`` finds nothing to stop). ``job.cancelled`` is looked at after
        each of those waits, and the engine is told as soon as the request reaches it.
        """
        message, model = job.message, job.model
        if job.cancelled:
            return None
        history = await self.directory.history(message.topic)
        if job.cancelled:
            return None
        turns = (ChatTurn("system", model.system_prompt or self.settings.system_prompt), *history,
                 ChatTurn("user", message.text))
        request = GenerateRequest(request_id=message.id, sampling=job.sampling, messages=turns,
                                  conversation=message.topic)
        seq = 0
        result: GenerationResult | None = None
        told_engine = silent = False
        async for item in self.runtime.generate_stream(model, request):
            if job.cancelled and not told_engine:
                told_engine = True
                await self.runtime.cancel(message.id)
                # Cancelled before anything was shown: show nothing of it. Once tokens are out,
                # the rest the engine makes before it stops belongs to the partial text.
                silent = seq == 0
            if isinstance(item, TokenChunk):
                if silent:
                    continue
                await self.publisher.token(GenerationToken(
                    request_id=message.id, topic=message.topic, author_id=model.person_id, seq=seq,
                    text=item.text, channel=item.channel))
                seq += 1
            else:
                job.finishing = True
                result = item
        if result is None:
            raise LamaError(ErrorCode.INTERNAL, "the engine ended a stream without a result")
        if silent:
            return None
        # The whole wait from acceptance to the engine starting on it: topic lane, topic slot,
        # model load and the engine's own queue (the engine stamps when it started).
        timing = msgspec.structs.replace(result.timing, queue_time=max(0.0, result.timing.start_time - job.accepted_at))
        return msgspec.structs.replace(result, timing=timing)

    async def _cancelled(self, job: _Job, *, text: str, tokens: int) -> None:
        message = job.message
        await self.directory.record_unanswered(message, "cancelled")
        await self.publisher.event(
            GenerationCancelled(request_id=message.id, topic=message.topic, author_id=job.model.person_id,
                                text=text, tokens=tokens, node_id=self.settings.node_id),
            dedup_id=f"{message.id}.cancelled.{message.topic}")
        await job.delivery.ack()
        self.counters["cancelled"] += 1

    async def _fail(self, message: ChatMessage, exc: LamaError, delivery: Delivery, *,
                    dedup_id: str | None = None) -> None:
        # A failure is an answer too: say it on the topic and settle the delivery,
        # so the message is not redelivered forever. A retry with the same id is answered.
        # ``dedup_id``: one the broker must drop when this failure is said again (a quota's refusal
        # of a redelivered message); by default every failure is said.
        self.counters[f"failed.{exc.code.value}"] += 1
        await self.publisher.event(GenerationFailed(request_id=message.id, topic=message.topic, error=exc.to_body(),
                                                    node_id=self.settings.node_id),
                                   dedup_id=dedup_id or f"{message.id}.failed.{exc.code.value}.{time.monotonic_ns()}")
        await delivery.ack()

    # -- cancel -----------------------------------------------------------------

    async def cancel(self, topic: str, request_id: str | None = None) -> CancelReply:
        lane = self._lanes.get(topic)
        if lane is None:
            return CancelReply(topic=topic, cancelled=False, request_id=request_id)
        current = lane.current
        if current is not None and request_id in (None, current.message.id):
            if current.finishing:  # the reply is being recorded and posted: too late
                return CancelReply(topic=topic, cancelled=False, request_id=current.message.id)
            current.cancelled = True
            # Stops it now if the engine has it; otherwise _generate stops it when it gets there.
            await self.runtime.cancel(current.message.id)
            return CancelReply(topic=topic, cancelled=True, request_id=current.message.id)
        for job in lane.jobs:
            if job.message.id == request_id:
                job.cancelled = True  # answered with an empty cancellation when its turn comes
                return CancelReply(topic=topic, cancelled=True, request_id=request_id)
        return CancelReply(topic=topic, cancelled=False, request_id=request_id)

    # -- liveness ---------------------------------------------------------------

    async def _keep_deliveries_alive(self) -> None:
        while True:
            await anyio.sleep(self.settings.progress_interval)
            for lane in list(self._lanes.values()):
                jobs = [*([lane.current] if lane.current else []), *lane.jobs]
                for job in jobs:
                    try:
                        await job.delivery.in_progress()
                    except Exception:  # a lost connection must not stop the ticker
                        log.warning("progress ack for %s failed", job.message.id, exc_info=True)

    def stats(self) -> dict[str, object]:
        return {
            "node_id": self.settings.node_id,
            "lanes": {t: {"running": l.current.message.id if l.current else None, "queued": len(l.jobs)}
                      for t, l in self._lanes.items()},
            "queued_per_model": {k: v for k, v in self._queued.items() if v},
            "counters": dict(self.counters),
            **({"quotas": self.quotas.stats()} if self.quotas is not None else {}),
        }


