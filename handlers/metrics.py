"""Prometheus metrics of one service, named after vLLM's and llama-server's (docs/operations.md, "Metrics").

No NATS and no HTTP here: ``bus/`` serves :meth:`ServiceMetrics.exposition` on
``/metrics`` and on ``<prefix>.api.metrics``. The text is made by
``prometheus_client`` from a :class:`~prometheus_client.CollectorRegistry` of the
service's own (never the process-wide default one), so two services in one
process keep apart.

Where each figure comes from:

* what happened to each reply, as it happens: :class:`MeteredPublisher` wraps the
  assistant's :class:`~handlers.ports.Publisher` and sees every
  ``generation.started``, token, ``.completed``, ``.failed`` and ``.cancelled``;
* model loads: the models runtime's ``on_load`` hook (:meth:`ServiceMetrics.model_load`);
* topic analyses: the analyser's ``on_outcome`` hook (:meth:`ServiceMetrics.topic_analysis`);
* what is true now (requests running and waiting, the KV cache, rejected messages):
  read when scraped, from the assistant's ``stats()``, the engine's
  ``diagnostics()``, the models runtime and the intake (:meth:`ServiceMetrics.observe`).

A token costs a dict lookup, a clock read and one histogram observation.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from handlers.ports import Publisher
from handlers.quotas import PATHS, QUOTAS
from wire.messages import (
    ChatMessage,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    GenerationToken,
    MessageRejected,
    TopicEvent,
)

log = logging.getLogger("lamabus.metrics")

PREFIX = "lamabus_"

# Buckets: vLLM's, with finer low ends, since a small model on a CPU answers in milliseconds.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                   40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

#: Requests followed at once; beyond this the oldest is forgotten (one handed back and never
#: seen again would otherwise stay for good).
MAX_LIVE = 10_000

OUTCOMES = ("completed", "failed", "cancelled", "rejected")


class AssistantLike(Protocol):
    def stats(self) -> dict[str, Any]: ...


class EngineLike(Protocol):
    def diagnostics(self) -> dict[str, Any]: ...


class LoadedLike(Protocol):
    model_id: str
    handle: str


class ModelsLike(Protocol):
    def loaded(self) -> Sequence[LoadedLike]: ...


class IntakeLike(Protocol):
    rejected: int


class QuotasLike(Protocol):
    """handlers/quotas.py's Quotas: (path, quota) -> refusals, path -> clamped requests."""

    refusals: collections.Counter[tuple[str, str]]
    clamped: collections.Counter[str]


@dataclass(eq=False, slots=True)
class _Live:
    """One request between its generation.started and its end."""

    model: str
    arrived: float
    ttft: Any  # the histograms' children for this model, looked up once per request
    itl: Any
    last: float = 0.0  # the previous token's time; 0 before the first


class ServiceMetrics:
    """The metrics of one service. ``publisher()`` wraps the assistant's publisher; ``observe()``
    names what is read at scrape time; ``exposition()`` is the text a scrape gets."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        self._live: dict[str, _Live] = {}
        self._models: set[str] = set()  # every model seen, so its gauges read 0 rather than vanish
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()  # (model, outcome)
        self.errors: collections.Counter[tuple[str, str]] = collections.Counter()  # (model, code)
        self.loads: collections.Counter[tuple[str, str]] = collections.Counter()  # (model, outcome)
        self.analyses: collections.Counter[tuple[str, str]] = collections.Counter()  # (model, outcome)
        self.prompt_tokens: collections.Counter[str] = collections.Counter()
        self.cached_tokens: collections.Counter[str] = collections.Counter()
        self.generation_tokens: collections.Counter[str] = collections.Counter()
        self._assistant: AssistantLike | None = None
        self._engine: EngineLike | None = None
        self._loaded: ModelsLike | None = None
        self._intake: IntakeLike | None = None
        self._quotas: QuotasLike | None = None

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(PREFIX + name, doc, ["model"], buckets=buckets, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds",
                              "Seconds from a message's acceptance (generation.started) to its first token.",
                              TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds",
                             "Seconds between two token messages of one reply.", ITL_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Seconds a completed request waited from acceptance until the engine started it "
                                    "(topic lane, topic slot, model load, engine queue).", REQUEST_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds",
                             "Seconds from a message's acceptance to its generation.completed.", REQUEST_BUCKETS)
        self.registry.register(_Collector(self))

    # ------------------------------------------------------------------ wiring

    def publisher(self, inner: Publisher) -> "MeteredPublisher":
        return MeteredPublisher(inner, self)

    def observe(self, *, assistant: AssistantLike | None = None, engine: EngineLike | None = None,
                models: ModelsLike | None = None, intake: IntakeLike | None = None,
                quotas: QuotasLike | None = None) -> None:
        """What the scrape-time figures are read from."""
        self._assistant, self._engine, self._loaded, self._intake = assistant, engine, models, intake
        self._quotas = quotas

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type): the text format, or OpenMetrics when ``accept`` asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    # ------------------------------------------------------------------ recording

    def model_load(self, model_id: str, outcome: str) -> None:
        """The models runtime's hook: ``outcome`` is ``loaded`` or ``failed``."""
        self._models.add(model_id)
        self.loads[(model_id, outcome)] += 1

    def topic_analysis(self, model_id: str, outcome: str) -> None:
        """The topic analyser's hook: ``outcome`` is ``completed``, ``failed``, ``invalid`` or ``preempted``."""
        self.analyses[(model_id, outcome)] += 1

    def started(self, event: GenerationStarted) -> None:
        model = event.model_id
        if model not in self._models:
            self._models.add(model)
        live = self._live
        if len(live) >= MAX_LIVE:
            del live[next(iter(live))]
        live[event.request_id] = _Live(model, self.clock(), self.ttft.labels(model), self.itl.labels(model))

    def token(self, token: GenerationToken) -> None:
        live = self._live.get(token.request_id)
        if live is None:
            return
        now = self.clock()
        if live.last:
            live.itl.observe(now - live.last)
        else:
            live.ttft.observe(now - live.arrived)
        live.last = now

    def completed(self, event: GenerationCompleted) -> None:
        live = self._live.pop(event.request_id, None)
        if live is None:
            # Not started here: a recorded reply published again after a redelivery. Counted once, when made.
            return
        model = live.model
        self.requests[(model, "completed")] += 1
        self.e2e.labels(model).observe(self.clock() - live.arrived)
        self.queue_time.labels(model).observe(max(0.0, event.timing.queue_time) / 1000.0)
        self.prompt_tokens[model] += event.usage.prompt_tokens
        self.cached_tokens[model] += event.usage.cached_tokens
        self.generation_tokens[model] += event.tokens

    def failed(self, event: GenerationFailed) -> None:
        live = self._live.pop(event.request_id, None)
        model = live.model if live is not None else ""  # "": failed before a model was chosen
        code = event.error.code.value
        self.requests[(model, "failed")] += 1
        self.errors[(model, code)] += 1

    def cancelled(self, event: GenerationCancelled) -> None:
        live = self._live.pop(event.request_id, None)
        model = live.model if live is not None else ""
        self.requests[(model, "cancelled")] += 1
        self.generation_tokens[model] += event.tokens

    def rejected(self, event: MessageRejected) -> None:
        """A message lamabus could not accept; also counted from the intake when it is observed
        (``observe(intake=...)``), so call this only for rejections the intake does not count."""
        self.requests[("", "rejected")] += 1
        self.errors[("", event.error.code.value)] += 1

    # ------------------------------------------------------------------ scrape time

    def _gauges(self) -> tuple[dict[str, int], dict[str, int]]:
        running: collections.Counter[str] = collections.Counter()
        waiting: collections.Counter[str] = collections.Counter()
        if self._assistant is None:
            return running, waiting
        stats = self._assistant.stats()
        live = self._live
        for lane in stats.get("lanes", {}).values():
            current = live.get(lane.get("running") or "")
            if current is not None:
                running[current.model] += 1
        # queued_per_model counts every accepted, unfinished request: the running ones too.
        for model, queued in stats.get("queued_per_model", {}).items():
            waiting[model] = max(0, queued - running[model])
        return running, waiting

    def _kv_usage(self) -> dict[str, float]:
        """KV cells held by sequences (conversations kept for prompt caching included) / cells, per model.

        The engine reports slot occupancy after each generation ends, so this is as of the last one."""
        if self._engine is None:
            return {}
        by_handle = {m.handle: m.model_id for m in self._loaded.loaded()} if self._loaded is not None else {}
        usage: dict[str, float] = {}
        try:
            for m in self._engine.diagnostics().get("models", []):
                context = m.get("context") or {}
                n_ctx, n_seq = context.get("nCtxPerSequence"), context.get("nSeqMax")
                slots = (m.get("worker") or {}).get("slots")
                if not n_ctx or not n_seq or slots is None:
                    continue
                model = next((by_handle[h] for h in m.get("handles", ()) if h in by_handle), None)
                if model is None:
                    model = os.path.basename(str(m.get("path") or m.get("name") or ""))
                used = sum(int(s.get("tokens", 0)) for s in slots)
                usage[model] = max(usage.get(model, 0.0), min(1.0, used / (n_ctx * n_seq)))
        except Exception:  # a scrape must answer even if the engine's report changes shape
            log.warning("could not read the KV cache usage from the engine's diagnostics", exc_info=True)
        return usage

    def _kv_saved(self) -> dict[str, dict[str, int]]:
        """The saved KV states of each model's worker (engine/kv_cache.py): bytes in RAM, hits, misses,
        restored tokens, as of the worker's last report. A restarted worker starts its counts again."""
        if self._engine is None:
            return {}
        by_handle = {m.handle: m.model_id for m in self._loaded.loaded()} if self._loaded is not None else {}
        out: dict[str, dict[str, int]] = {}
        try:
            for m in self._engine.diagnostics().get("models", []):
                kv = (m.get("worker") or {}).get("kvCache") or {}
                if not kv:
                    continue
                model = next((by_handle[h] for h in m.get("handles", ()) if h in by_handle), None)
                if model is None:
                    model = os.path.basename(str(m.get("path") or m.get("name") or ""))
                mine = out.setdefault(model, collections.Counter())
                for k in ("ramBytes", "diskBytes", "hits", "misses", "restoredTokens"):
                    mine[k] += int(kv.get(k, 0))
        except Exception:  # a scrape must answer even if the engine's report changes shape
            log.warning("could not read the saved KV states from the engine's diagnostics", exc_info=True)
        return out


class _Collector:
    """Counters and gauges, made from the recorder's plain counts at scrape time."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        requests = CounterMetricFamily(PREFIX + "requests", "Messages lamabus finished handling, by outcome "
                                       "(completed, failed, cancelled, rejected).", labels=["model", "outcome"])
        counts = collections.Counter(m.requests)
        if m._intake is not None:
            counts[("", "rejected")] += m._intake.rejected
        for model in sorted(m._models):
            for outcome in OUTCOMES[:3]:
                counts.setdefault((model, outcome), 0)
        counts.setdefault(("", "rejected"), 0)
        _add(requests, counts)
        yield requests

        errors = CounterMetricFamily(PREFIX + "errors", "Coded errors answered on topics (generation.failed), "
                                     "by error code.", labels=["model", "code"])
        _add(errors, m.errors)
        yield errors

        yield from _quota_families(m._quotas)

        loads = CounterMetricFamily(PREFIX + "model_loads", "Model loads by outcome (loaded, failed).",
                                    labels=["model", "outcome"])
        _add(loads, m.loads)
        yield loads

        analyses = CounterMetricFamily(PREFIX + "topic_analyses", "Background topic analyses by outcome "
                                       "(completed; failed, invalid: counted, not retried until more replies "
                                       "come; preempted: gave way to a user's message, runs again when idle).",
                                       labels=["model", "outcome"])
        _add(analyses, m.analyses)
        yield analyses

        for name, doc, counter in (
            ("prompt_tokens", "Prompt tokens of completed replies.", m.prompt_tokens),
            ("prompt_tokens_cached", "Prompt tokens of completed replies found in the KV cache.", m.cached_tokens),
            ("generation_tokens", "Tokens generated for completed and cancelled replies.", m.generation_tokens),
        ):
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model"])
            for model in sorted(m._models | set(counter)):
                family.add_metric([model], counter.get(model, 0))
            yield family

        running, waiting = m._gauges()
        for name, doc, values in (
            ("requests_running", "Replies being made now (a topic's current message).", running),
            ("requests_waiting", "Accepted messages waiting for their turn.", waiting),
        ):
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model"])
            for model in sorted(m._models | set(values)):
                gauge.add_metric([model], values.get(model, 0))
            yield gauge

        kv = GaugeMetricFamily(PREFIX + "engine_kv_cache_usage_ratio",
                               "KV cache cells held by sequences / cells, per loaded model (1 = full).",
                               labels=["model"])
        for model, ratio in sorted(m._kv_usage().items()):
            kv.add_metric([model], ratio)
        yield kv

        saved = m._kv_saved()
        for name, key, doc, family_type in (
            ("kv_cache_ram_bytes", "ramBytes", "Bytes of saved KV states held in host memory (conversations that "
             "lost their slot; kv_cache_ram).", GaugeMetricFamily),
            ("kv_cache_disk_bytes", "diskBytes", "Bytes of saved KV states on disk (kv_cache_disk).", GaugeMetricFamily),
            ("kv_cache_hits", "hits", "Prompts whose start was restored from a saved KV state.", CounterMetricFamily),
            ("kv_cache_misses", "misses", "Prompts that looked for a saved KV state and found none.",
             CounterMetricFamily),
            ("kv_cache_restored_tokens", "restoredTokens", "Prompt tokens restored from saved KV states instead of "
             "evaluated.", CounterMetricFamily),
        ):
            family = family_type(PREFIX + name, doc, labels=["model"])
            for model, figures in sorted(saved.items()):
                family.add_metric([model], figures.get(key, 0))
            yield family


def _quota_families(quotas: QuotasLike | None) -> Iterator[Metric]:
    """Per-author quotas (handlers/quotas.py): every path and quota is listed, at 0 until one happens."""
    if quotas is None:
        return
    refusals = CounterMetricFamily(PREFIX + "quota_refusals", "Requests refused by a per-author quota, by path "
                                   "(topic: chat messages; llm: llm.generate) and quota (max_tokens, prompt, rate, "
                                   "running).", labels=["path", "quota"])
    clamped = CounterMetricFamily(PREFIX + "quota_clamped", "Requests whose maxTokens was lowered to the cap "
                                  "(quota_max_tokens_policy = clamp), by path.", labels=["path"])
    for path in PATHS:
        for quota in QUOTAS:
            refusals.add_metric([path, quota], quotas.refusals.get((path, quota), 0))
        clamped.add_metric([path], quotas.clamped.get(path, 0))
    yield refusals
    yield clamped


def _add(family: CounterMetricFamily, counts: Iterable[tuple[tuple[str, str], int]] | dict[Any, int]) -> None:
    items = counts.items() if isinstance(counts, dict) else counts
    for labels, value in sorted(items):
        family.add_metric(list(labels), value)


class MeteredPublisher:
    """A :class:`~handlers.ports.Publisher` that records what passes through it, then passes it on.

    Recorded before it is passed on: a reply recorded and then lost on the way out is
    published again later from the registry, and counted only here, once."""

    def __init__(self, inner: Publisher, metrics: ServiceMetrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self._inner_token = inner.token
        self._token = metrics.token

    async def token(self, token: GenerationToken) -> None:
        self._token(token)
        await self._inner_token(token)

    async def event(self, event: TopicEvent, *, dedup_id: str, wait: bool = True) -> None:
        m = self.metrics
        if isinstance(event, GenerationStarted):
            m.started(event)
        elif isinstance(event, GenerationCompleted):
            m.completed(event)
        elif isinstance(event, GenerationFailed):
            m.failed(event)
        elif isinstance(event, GenerationCancelled):
            m.cancelled(event)
        elif isinstance(event, MessageRejected):
            m.rejected(event)
        await self.inner.event(event, dedup_id=dedup_id, wait=wait)

    async def message(self, message: ChatMessage) -> None:
        await self.inner.message(message)
