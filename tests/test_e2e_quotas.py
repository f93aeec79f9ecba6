"""Per-author quotas (issue 20, section 4) on a real nats-server with the real bundled model: each
refusal reaches its author on the topic (generation.failed) and on the llm API (a coded error reply),
the clamp policy gives at most the cap's tokens, and every refusal and clamp is counted in /metrics."""

from __future__ import annotations

import signal
import uuid
from datetime import datetime, timezone
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client

from bench.serve_process import ServeProcess
from bus.client import LamabusClient
from bus.config import Settings
from bus.node.app import LamabusService
from tests.conftest import entered_in_own_task
from tests.test_faults import COUNTING, PARAMS, QUICK, assert_answered_once, chat, first_token, post, stored, wait_end
from tests.test_metrics import Samples, scrape_http, value
from wire.api import ChatTurnIn, LlmGenerate, LlmInitialize, LlmResult
from wire.errors import ErrorCode, LamaError
from wire.messages import ChatMessage, GenerationCompleted, GenerationFailed, GenerationStarted, GenerationToken
from wire.messages import decode_topic_event
from wire.params import GenerationParams

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
#: Asks for far more than any cap here; a stop that never comes, so only the token limit ends it.
GREEDY_LONG = GenerationParams(temperature=0.0, max_tokens=1000, seed=1, stop=["@@@@"])
ONE = GenerationParams(temperature=0.0, max_tokens=1, seed=1)


def quota_settings(tmp_path: Path, nats_url: str, **quotas) -> Settings:
    return Settings(nats_url=nats_url, data_dir=str(tmp_path / "data"), metrics="127.0.0.1:0", web="off",
                    analysis=False, **quotas)


async def refused(call) -> LamaError:
    with pytest.raises(LamaError) as exc:
        await call
    return exc.value


async def ask(client: LamabusClient, topic: str, text: str, author: str, params: GenerationParams) -> list:
    return [item async for item in client.ask(topic, text, author_id=author, params=params, timeout=120)]


def refusals(samples: Samples, path: str, quota: str) -> float:
    return value(samples, "lamabus_quota_refusals_total", path=path, quota=quota)


async def test_clamp_prompt_and_rate_on_the_topic_and_the_llm_api(tmp_path, nats_url):
    settings = quota_settings(tmp_path, nats_url, quota_max_tokens=8, quota_max_tokens_policy="clamp",
                              quota_prompt_chars=200, quota_messages_per_minute=4, quota_running_per_author=0)
    async with entered_in_own_task(LamabusService(settings)) as service, \
            LamabusClient.connect(service.url, prefix=settings.prefix) as client:
        before = await scrape_http(service)
        for path in ("topic", "llm"):
            for quota in ("max_tokens", "prompt", "rate", "running"):
                assert ("lamabus_quota_refusals_total", (("path", path), ("quota", quota))) in before
        # Clamp: maxTokens 1000 asked, at most 8 made, on the topic ...
        *_, completed = await ask(client, "quota-a", "Count from one to one hundred.", "alice", GREEDY_LONG)
        assert isinstance(completed, GenerationCompleted)
        assert completed.tokens == completed.usage.completion_tokens <= 8
        assert completed.finish_reason == "length"
        # ... and on the llm API.
        handle = await client.call(LlmInitialize(model_id=MODEL), timeout=120)
        result = await client.call(LlmGenerate(handle=handle.handle, prompt="One, two, three, four,",
                                               params=GREEDY_LONG, author_id="carol"), timeout=120)
        assert isinstance(result, LlmResult) and result.tokens <= 8 and result.finish_reason == "length"

        # Prompt cap: 201 characters are refused, on the topic and on the llm API, and cost no rate.
        big = "x" * 201
        err = await refused(ask(client, "quota-a", big, "alice", ONE))
        assert err.code is ErrorCode.PROMPT_TOO_LARGE and err.details == {"chars": 201, "limit": 200}
        err = await refused(client.call(LlmGenerate(handle=handle.handle, messages=[
            ChatTurnIn("user", "x" * 150), ChatTurnIn("assistant", "y" * 51)], params=ONE, author_id="carol")))
        assert err.code is ErrorCode.PROMPT_TOO_LARGE and err.status == 400

        # Rate: alice has 1 accepted message; 3 more fit in the minute, the 5th is refused ...
        for n in range(3):
            items = await ask(client, f"quota-{n}", f"Say {n}.", "alice", ONE)
            assert isinstance(items[-1], GenerationCompleted)
        err = await refused(ask(client, "quota-b", "One more?", "alice", ONE))
        assert err.code is ErrorCode.RATE_LIMITED and err.details["retryable"] is True
        assert 0 < err.details["retryAfterMs"] <= 60_000 and err.details["limit"] == 4
        # ... on the llm API too: the same author's window, whichever path the requests took.
        err = await refused(client.call(LlmGenerate(handle=handle.handle, prompt="Hi", params=ONE,
                                                    author_id="alice")))
        assert err.code is ErrorCode.RATE_LIMITED and err.status == 429 and err.details["retryAfterMs"] > 0
        # Another author is not held back by alice.
        assert isinstance((await ask(client, "quota-b", "Hello?", "bob", ONE))[-1], GenerationCompleted)

        after = await scrape_http(service)
        for path, quota, moved in (("topic", "prompt", 1), ("llm", "prompt", 1), ("topic", "rate", 1),
                                   ("llm", "rate", 1), ("topic", "running", 0), ("topic", "max_tokens", 0)):
            assert refusals(after, path, quota) - refusals(before, path, quota) == moved, (path, quota)
        for path in ("topic", "llm"):
            assert value(after, "lamabus_quota_clamped_total", path=path) - \
                value(before, "lamabus_quota_clamped_total", path=path) == 1, path
        # The topic's refusals are generation.failed events, counted by code with the other errors.
        assert value(after, "lamabus_errors_total", model="", code="rate_limited") == 1
        assert value(after, "lamabus_errors_total", model="", code="prompt_too_large") == 1


async def test_running_per_author_and_the_refuse_policy(tmp_path, nats_url):
    settings = quota_settings(tmp_path, nats_url, quota_max_tokens=500, quota_max_tokens_policy="refuse",
                              quota_running_per_author=1, quota_messages_per_minute=0)
    long = GenerationParams(temperature=0.0, max_tokens=400, seed=1, stop=["@@@@"])
    async with entered_in_own_task(LamabusService(settings)) as service, \
            LamabusClient.connect(service.url, prefix=settings.prefix) as client:
        before = await scrape_http(service)
        # Refuse: above the cap is refused on the topic and on the llm API, at the cap it is answered.
        err = await refused(ask(client, "quota-r", "Hi", "alice", GenerationParams(max_tokens=501)))
        assert err.code is ErrorCode.MAX_TOKENS_EXCEEDED and err.details["limit"] == 500
        handle = await client.call(LlmInitialize(model_id=MODEL), timeout=120)
        err = await refused(client.call(LlmGenerate(handle=handle.handle, prompt="Hi", author_id="alice",
                                                    params=GenerationParams(max_tokens=501))))
        assert err.code is ErrorCode.MAX_TOKENS_EXCEEDED and err.status == 400
        items = await ask(client, "quota-r", "Say yes.", "alice", GenerationParams(max_tokens=500, temperature=0.0))
        assert isinstance(items[-1], GenerationCompleted)

        # Running: bob's long reply holds topic quota-x; alice's message there waits behind it (accepted, so
        # it is hers in flight), and her next one, in another topic, is refused until the first is answered.
        events: dict[str, list] = {}
        first_token, alice_started, alice_answered = anyio.Event(), anyio.Event(), anyio.Event()

        async def on_event(msg) -> None:
            event = decode_topic_event(msg.data)
            rid = getattr(event, "request_id", None)
            if rid is not None:
                events.setdefault(rid, []).append(event)
            if isinstance(event, GenerationToken) and rid == bob.id:
                first_token.set()
            if isinstance(event, GenerationStarted) and rid == waiting.id:
                alice_started.set()
            if isinstance(event, (GenerationCompleted, GenerationFailed)) and rid == waiting.id:
                alice_answered.set()

        def message(topic: str, author: str, text: str, params: GenerationParams) -> ChatMessage:
            return ChatMessage(id=str(uuid.uuid4()), topic=topic, author_id=author, text=text,
                               sent_at=datetime.now(timezone.utc), params=params)

        bob = message("quota-x", "bob", "Count to 300.", long)
        waiting = message("quota-x", "alice", "Say A.", ONE)
        await client.nc.subscribe(f"{settings.prefix}.topic.*.evt", cb=on_event)
        await client.nc.subscribe(f"{settings.prefix}.topic.*.tok", cb=on_event)
        await client.nc.flush()
        await client.post(bob)
        with anyio.fail_after(120):
            await first_token.wait()
        await client.post(waiting)
        with anyio.fail_after(60):
            await alice_started.wait()
        assert events[waiting.id][0].queue_position == 1  # behind bob's
        err = await refused(ask(client, "quota-y", "Say B.", "alice", ONE))
        assert err.code is ErrorCode.TOO_MANY_RUNNING and err.details == {"retryable": True, "running": 1,
                                                                         "limit": 1}
        err = await refused(client.call(LlmGenerate(handle=handle.handle, prompt="Hi", params=ONE,
                                                    author_id="alice")))
        assert err.code is ErrorCode.TOO_MANY_RUNNING and err.status == 429
        # Bob is not alice: his own place is taken, but not by her.
        assert (await client.call(LlmGenerate(handle=handle.handle, prompt="Hi", params=ONE,
                                              author_id="carol"))).tokens == 1
        await client.cancel("quota-x", bob.id)
        with anyio.fail_after(120):
            await alice_answered.wait()
        assert isinstance(events[waiting.id][-1], GenerationCompleted)
        # Her place is hers again once the message is settled: acked, just after its completion went out.
        with anyio.fail_after(10):
            while service.quotas.running("alice"):
                await anyio.sleep(0.01)
        assert isinstance((await ask(client, "quota-y", "Say B.", "alice", ONE))[-1], GenerationCompleted)
        assert not any(isinstance(e, GenerationFailed) for e in events[waiting.id])

        after = await scrape_http(service)
        for path, quota, moved in (("topic", "max_tokens", 1), ("llm", "max_tokens", 1), ("topic", "running", 1),
                                   ("llm", "running", 1), ("topic", "rate", 0)):
            assert refusals(after, path, quota) - refusals(before, path, quota) == moved, (path, quota)
        assert value(after, "lamabus_quota_clamped_total", path="topic") == 0  # refuse policy: nothing lowered


@pytest.mark.slow
async def test_a_message_accepted_before_a_crash_is_answered_not_refused_after_the_restart(tmp_path, nats_url):
    """Exactly once under quotas: ``lamabus serve`` is killed while it answers the author's message A;
    while it is down the author posts B. The restarted node (fresh counts) takes B first, which fills
    the author's minute (1 message) and running place (1); A comes again after ack_wait, and is
    answered (it was accepted before the crash), never refused."""
    config = tmp_path / "lamabus.toml"
    # A long ack_wait: A is offered again well after the restarted node has taken B.
    config.write_text('[lamabus]\nlog_level = "info"\nack_wait = 15\nweb = "off"\n'
                      'quota_messages_per_minute = 1\nquota_running_per_author = 1\n')
    service = ServeProcess(nats_url, tmp_path / "data", config, strict=True)
    nc = Client()
    await nc.connect(nats_url)
    try:
        js = nc.jetstream()
        await service.start()
        a = chat("crash-a", COUNTING, PARAMS)
        await first_token(nc, "crash-a", a.id, lambda: post(js, a))
        assert await service.kill() == -signal.SIGKILL
        b = chat("crash-b", "Say B.", QUICK)
        await post(js, b)
        await service.start()
        ended_b = await wait_end(js, "crash-b", b.id, timeout=120)
        ended_a = await wait_end(js, "crash-a", a.id, timeout=120)
        assert isinstance(ended_a, GenerationCompleted), ended_a  # never rate_limited nor too_many_running
        assert_answered_once(await stored(js, "crash-a"), "crash-a", a.id)
        # B, taken first by the fresh node, was answered too (the order the test is about).
        assert isinstance(ended_b, GenerationCompleted), ended_b
        assert await service.stop() == 0, service.log_tail()
    finally:
        await service.aclose()
        await nc.close()
