"""Prometheus metrics (issue 13 part 3): scraped over HTTP and over ``lama.api.metrics``, parsed
with ``prometheus_client.parser``; each counter moves by exactly what happened."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bus.node.publisher import MSG_ID
from handlers.metrics import MeteredPublisher, ServiceMetrics
from wire.api import MetricsGet
from wire.errors import ErrorBody, ErrorCode, LamaError
from wire.messages import (
    ChatMessage,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    GenerationToken,
    MessageRejected,
    Timing,
    TopicEvent,
    Usage,
    decode_topic_event,
)
from wire.params import GenerationParams

MODEL = "smollm2-135m-instruct"
SHORT = GenerationParams(temperature=0.0, max_tokens=12, seed=1)
#: Long enough that it is still running when the cancel lands.
LONG = GenerationParams(temperature=0.0, max_tokens=400, seed=1, stop=[])

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist yet."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape_http(service) -> Samples:
    url = service.metrics_http.url
    assert Path(service.settings.data_path / "metrics.url").read_text().strip() == url

    def get() -> tuple[str, str]:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.headers["Content-Type"], response.read().decode()

    content_type, text = await asyncio.to_thread(get)
    assert content_type.startswith("text/plain; version=")
    return parse(text)


async def scrape_bus(client) -> Samples:
    reply = await client.call(MetricsGet())
    assert reply.content_type.startswith("text/plain; version=")
    return parse(reply.text)


def delta(before: Samples, after: Samples) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every counter and histogram sample that moved (``_created`` timestamps and gauges left out)."""
    keys = set(before) | set(after)
    moved = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys
             if not k[0].endswith("_created") and not k[0].endswith(("_running", "_waiting", "_ratio"))}
    return {k: v for k, v in moved.items() if v}


def hist(name: str, model: str = MODEL) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (f"lamabus_{name}_count", (("model", model),))


def counter(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (f"lamabus_{name}", tuple(sorted(labels.items())))


def only_counts(moved: dict) -> dict:
    """Drop histogram buckets and sums (their exact values depend on the clock)."""
    return {k: v for k, v in moved.items() if not k[0].endswith(("_bucket", "_sum"))}


@pytest.fixture
def settings(tmp_path: Path, nats_url: str):
    from bus.config import Settings

    return Settings(nats_url=nats_url, data_dir=str(tmp_path / "data"), metrics="127.0.0.1:0", web="off",
                    analysis=False)  # a background analysis would move counters this test pins exactly


@pytest.mark.model
async def test_counters_move_by_what_happened_reply_cancel_rejection_failure(service, client):
    # -- a reply: the first one also loads the model.
    before = await scrape_bus(client)
    items = [i async for i in client.ask("metrics-reply", "Say hi.", params=SHORT)]
    done = items[-1]
    assert isinstance(done, GenerationCompleted)
    tokens = [i for i in items if isinstance(i, GenerationToken)]
    after = await scrape_http(service)
    assert only_counts(delta(before, after)) == {k: v for k, v in {
        counter("requests_total", model=MODEL, outcome="completed"): 1,
        counter("model_loads_total", model=MODEL, outcome="loaded"): 1,
        counter("generation_tokens_total", model=MODEL): done.tokens,
        counter("prompt_tokens_total", model=MODEL): done.usage.prompt_tokens,
        counter("prompt_tokens_cached_total", model=MODEL): done.usage.cached_tokens,
        counter("kv_cache_misses_total", model=MODEL): 1,  # a new topic: no saved KV state to restore
        hist("time_to_first_token_seconds"): 1,
        hist("inter_token_latency_seconds"): len(tokens) - 1,
        hist("request_queue_time_seconds"): 1,
        hist("e2e_request_latency_seconds"): 1,
    }.items() if v}
    # The histograms' sums are the reply's own figures (queue time: the engine's, in ms).
    assert value(after, "lamabus_request_queue_time_seconds_sum", model=MODEL) - value(
        before, "lamabus_request_queue_time_seconds_sum", model=MODEL) == pytest.approx(done.timing.queue_time / 1000)
    e2e = value(after, "lamabus_e2e_request_latency_seconds_sum", model=MODEL)
    ttft = value(after, "lamabus_time_to_first_token_seconds_sum", model=MODEL)
    assert 0 < ttft < e2e
    assert done.tokens > 1 and len(tokens) > 1
    assert value(after, "lamabus_requests_running", model=MODEL) == 0
    assert value(after, "lamabus_requests_waiting", model=MODEL) == 0
    assert 0 < value(after, "lamabus_engine_kv_cache_usage_ratio", model=MODEL) <= 1

    # -- a cancel after the first token.
    before = await scrape_http(service)
    topic, mid = "metrics-cancel", str(uuid.uuid4())
    end = None
    with anyio.fail_after(120):
        async with contextlib.aclosing(client.ask(topic, "Count from 1 to 300.", params=LONG, message_id=mid)) as it:
            async for item in it:
                if isinstance(item, GenerationToken) and item.seq == 0:
                    during = await scrape_bus(client)
                    assert value(during, "lamabus_requests_running", model=MODEL) == 1
                    assert (await client.cancel(topic, mid)).cancelled
                elif isinstance(item, (GenerationCompleted, GenerationCancelled)):
                    end = item
    assert isinstance(end, GenerationCancelled) and end.tokens > 0
    after = await scrape_bus(client)
    moved = only_counts(delta(before, after))
    itl = moved.pop(hist("inter_token_latency_seconds"), 0)
    assert moved == {
        counter("requests_total", model=MODEL, outcome="cancelled"): 1,
        counter("generation_tokens_total", model=MODEL): end.tokens,
        counter("kv_cache_misses_total", model=MODEL): 1,
        hist("time_to_first_token_seconds"): 1,
    }
    assert 0 <= itl < end.tokens  # one per token message after the first; more tokens than messages

    # -- a payload that is no chat message: rejected by the intake.
    before = after
    topic = "metrics-rejected"
    sub = await client.nc.subscribe(client.subjects.evt(topic))
    await client.nc.flush()
    await client.js.publish(client.subjects.msg(topic), b'{"type": "chat.message", "id": "bad-1"}',
                            headers={MSG_ID: "bad-1"})
    with anyio.fail_after(30):
        rejected = decode_topic_event((await sub.next_msg(timeout=30)).data)
    await sub.unsubscribe()
    assert isinstance(rejected, MessageRejected) and rejected.message_id == "bad-1"
    after = await scrape_http(service)
    assert delta(before, after) == {counter("requests_total", model="", outcome="rejected"): 1}

    # -- a failure: a model that does not exist (no model was chosen, so model="").
    before = after
    with pytest.raises(LamaError) as failed:
        async for _ in client.ask("metrics-failed", "Hi", model_id="no-such-model", timeout=60):
            pass
    assert failed.value.code is ErrorCode.MODEL_NOT_FOUND
    after = await scrape_bus(client)
    assert delta(before, after) == {
        counter("requests_total", model="", outcome="failed"): 1,
        counter("errors_total", model="", code="model_not_found"): 1,
    }

    # Quiet now: both ways of scraping say the same.
    http, bus = await scrape_http(service), await scrape_bus(client)
    assert delta(http, bus) == {} and delta(bus, http) == {}


async def test_metrics_off_and_bus_only(tmp_path: Path, nats_url: str, capsys):
    from bus.node.app import LamabusService
    from bus.cli.main import main
    from bus.client import LamabusClient
    from bus.config import Settings
    from tests.conftest import entered_in_own_task

    for mode in ("bus", "off"):
        settings = Settings(nats_url=nats_url, data_dir=str(tmp_path / mode), metrics=mode, web="off",
                            prefix=f"m{mode}")
        async with entered_in_own_task(LamabusService(settings)) as svc:
            assert svc.metrics_http is None and not settings.metrics_url_file.exists()
            async with LamabusClient.connect(svc.url, prefix=settings.prefix) as client:
                if mode == "bus":
                    samples = await scrape_bus(client)
                    assert value(samples, "lamabus_requests_total", model="", outcome="rejected") == 0
                    # `lamabus metrics` prints the same text.
                    capsys.readouterr()
                    argv = ["metrics", "--nats-url", nats_url, "--prefix", settings.prefix]
                    assert await anyio.to_thread.run_sync(main, argv) == 0
                    printed = parse(capsys.readouterr().out)
                    assert value(printed, "lamabus_requests_total", model="", outcome="rejected") == 0
                    assert {k for k in printed if not k[0].endswith("_created")} == {
                        k for k in samples if not k[0].endswith("_created")}
                else:
                    with pytest.raises(LamaError) as exc:
                        await scrape_bus(client)
                    assert exc.value.code is ErrorCode.NOT_FOUND


def test_settings_metrics_from_environment():
    from bus.config import load_settings

    s = load_settings({}, environ={"LAMABUS_METRICS": "127.0.0.1:9464"})
    assert s.metrics_address == ("127.0.0.1", 9464)
    assert load_settings({}, environ={}).metrics_address is None
    with pytest.raises(LamaError):
        load_settings({"metrics": "nonsense"}, environ={})


def test_topic_analyses_are_counted_by_model_and_outcome():
    metrics = ServiceMetrics()
    for outcome in ("completed", "completed", "preempted", "invalid"):
        metrics.topic_analysis("m1", outcome)
    samples = parse(metrics.exposition()[0].decode())
    assert value(samples, "lamabus_topic_analyses_total", model="m1", outcome="completed") == 2
    assert value(samples, "lamabus_topic_analyses_total", model="m1", outcome="preempted") == 1
    assert value(samples, "lamabus_topic_analyses_total", model="m1", outcome="invalid") == 1
    assert value(samples, "lamabus_topic_analyses_total", model="m1", outcome="failed") == 0


# ---------------------------------------------------------------------------- the recorder alone


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def token(self, token: GenerationToken) -> None:
        self.sent.append(token)

    async def event(self, event: TopicEvent, *, dedup_id: str, wait: bool = True) -> None:
        self.sent.append(event)

    async def message(self, message: ChatMessage) -> None:
        self.sent.append(message)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _completed(request_id: str, tokens: int) -> GenerationCompleted:
    return GenerationCompleted(
        request_id=request_id, message_id="r", topic="t", author_id="ai", model_id="m", text="x", thinking="",
        tokens=tokens, finish_reason="stop",
        timing=Timing(start_time=0, end_time=0, elapsed_time=0, tokens_per_second=0, time_to_first_token=0,
                      queue_time=250.0),
        usage=Usage(prompt_tokens=10, completion_tokens=tokens, total_tokens=10 + tokens, cached_tokens=4))


async def test_metered_publisher_records_exact_latencies_and_passes_everything_on():
    clock, inner = _Clock(), _Recorder()
    metrics = ServiceMetrics(clock=clock)
    pub = MeteredPublisher(inner, metrics)
    started = GenerationStarted(request_id="q1", topic="t", author_id="ai", model_id="m")
    await pub.event(started, dedup_id="s")
    clock.now += 0.5
    await pub.token(GenerationToken(request_id="q1", topic="t", author_id="ai", seq=0, text="a"))
    clock.now += 0.02
    await pub.token(GenerationToken(request_id="q1", topic="t", author_id="ai", seq=1, text="b"))
    clock.now += 0.03
    await pub.token(GenerationToken(request_id="q1", topic="t", author_id="ai", seq=2, text="c"))
    clock.now += 0.01
    await pub.event(_completed("q1", 3), dedup_id="c")
    # Published again after a redelivery (the reply was recorded): not counted twice.
    await pub.event(_completed("q1", 3), dedup_id="c")
    await pub.event(GenerationFailed(request_id="q2", topic="t", error=ErrorBody(ErrorCode.BUSY, "full")),
                    dedup_id="f")
    assert len(inner.sent) == 7

    s = parse(metrics.exposition()[0].decode())
    assert value(s, "lamabus_time_to_first_token_seconds_sum", model="m") == pytest.approx(0.5)
    assert value(s, "lamabus_inter_token_latency_seconds_count", model="m") == 2
    assert value(s, "lamabus_inter_token_latency_seconds_sum", model="m") == pytest.approx(0.05)
    assert value(s, "lamabus_e2e_request_latency_seconds_sum", model="m") == pytest.approx(0.56)
    assert value(s, "lamabus_request_queue_time_seconds_sum", model="m") == pytest.approx(0.25)
    assert value(s, "lamabus_requests_total", model="m", outcome="completed") == 1
    assert value(s, "lamabus_requests_total", model="", outcome="failed") == 1
    assert value(s, "lamabus_errors_total", model="", code="busy") == 1
    assert value(s, "lamabus_generation_tokens_total", model="m") == 3
    assert value(s, "lamabus_prompt_tokens_total", model="m") == 10
    assert value(s, "lamabus_prompt_tokens_cached_total", model="m") == 4

    # A second service in the same process has its own registry: no clash, its own counts.
    other = parse(ServiceMetrics().exposition()[0].decode())
    assert value(other, "lamabus_requests_total", model="m", outcome="completed") == 0


def test_openmetrics_when_asked():
    body, content_type = ServiceMetrics().exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().rstrip().endswith("# EOF")


def test_gauges_are_read_when_scraped():
    class Assistant:
        def stats(self) -> dict[str, Any]:
            return {"lanes": {"a": {"running": "q1", "queued": 2}, "b": {"running": "q2", "queued": 0}},
                    "queued_per_model": {"m": 4, "n": 1}}

    class Loaded:
        model_id, handle = "m", "h1"

    class Models:
        def loaded(self) -> list[Loaded]:
            return [Loaded()]

    class Engine:
        def diagnostics(self) -> dict[str, Any]:
            return {"models": [{"handles": ["h1"], "path": "/x/m.gguf",
                                "context": {"nCtxPerSequence": 1000, "nSeqMax": 4},
                                "worker": {"slots": [{"tokens": 300}, {"tokens": 100}, {"tokens": 0}]}}]}

    class Intake:
        rejected = 3

    metrics = ServiceMetrics()
    metrics.started(GenerationStarted(request_id="q1", topic="a", author_id="ai", model_id="m"))
    metrics.started(GenerationStarted(request_id="q2", topic="b", author_id="ai", model_id="n"))
    metrics.observe(assistant=Assistant(), engine=Engine(), models=Models(), intake=Intake())
    s = parse(metrics.exposition()[0].decode())
    assert value(s, "lamabus_requests_running", model="m") == 1
    assert value(s, "lamabus_requests_waiting", model="m") == 3
    assert value(s, "lamabus_requests_running", model="n") == 1
    assert value(s, "lamabus_requests_waiting", model="n") == 0
    assert value(s, "lamabus_engine_kv_cache_usage_ratio", model="m") == pytest.approx(0.1)
    assert value(s, "lamabus_requests_total", model="", outcome="rejected") == 3
