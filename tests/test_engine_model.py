"""The engine with the real bundled model: generation, stops, cancellation, prefix reuse, handles, batching.

One worker is shared by the module (loading takes a second); generations stay short.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio

from engine.runtime import Engine
from engine.types import ChatTurn, GenerateRequest, GenerationResult, ModelConfig, TokenChunk
from wire.errors import ErrorCode, LamaError
from wire.params import GenerationParams, SamplingParams

pytestmark = [pytest.mark.model, pytest.mark.asyncio(loop_scope="module")]

CONFIG = dict(n_ctx=512, n_batch=256, n_seq_max=4, n_gpu_layers=1)


def sampling(**kw) -> SamplingParams:
    stop = kw.pop("stop", None)
    s = SamplingParams.resolve(GenerationParams(**{"temperature": 0.0, "max_tokens": 24, **kw}))
    if stop is not None:
        s = msgspec.structs.replace(s, stop=tuple(stop))
    return s


def chat(rid: str, *turns: tuple[str, str], conversation: str | None = None, **kw) -> GenerateRequest:
    ignore_eos = kw.pop("ignore_eos", False)
    return GenerateRequest(
        rid,
        sampling(**kw),
        messages=tuple(ChatTurn(r, c) for r, c in turns),  # type: ignore[arg-type]
        conversation=conversation,
        ignore_eos=ignore_eos,
    )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    async with Engine() as e:
        yield e


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def handle(engine: Engine, model_path: Path):
    h = await engine.initialize(ModelConfig(str(model_path), **CONFIG))
    yield h


@pytest_asyncio.fixture(loop_scope="module")
async def fresh(model_path: Path):
    """An engine whose slots hold nothing yet.

    Answers that tests check by content come from fresh slots: a prompt whose prefix was cached while
    evaluating a *different*, long prompt gets slightly different logits (llama.cpp's batched matmuls
    round differently by batch size; bench/baseline.py's raw loop shows the same), and a 135M model
    flips between near-tied tokens.
    """
    async with Engine() as e:
        yield e, await e.initialize(ModelConfig(str(model_path), **CONFIG))


async def collect(engine: Engine, handle: str, req: GenerateRequest) -> tuple[list[TokenChunk], GenerationResult]:
    chunks: list[TokenChunk] = []
    result = None
    async for item in engine.generate_stream(handle, req):
        assert result is None, "nothing may follow the GenerationResult"
        if isinstance(item, GenerationResult):
            result = item
        else:
            chunks.append(item)
    assert result is not None
    assert "".join(c.text for c in chunks if c.channel == "content") == result.text
    assert "".join(c.text for c in chunks if c.channel == "thinking") == result.thinking
    return chunks, result


async def test_greedy_is_deterministic(fresh):
    engine, handle = fresh
    q = ("user", "Which city is the capital of France?")
    _, a = await collect(engine, handle, chat("det-1", q))
    _, b = await collect(engine, handle, chat("det-2", q))
    assert a.text and a.text == b.text
    assert "Paris" in a.text
    assert a.usage.prompt_tokens > 5 and a.usage.completion_tokens == a.tokens <= 24
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.tokens
    assert a.timing.elapsed_time > 0 and a.timing.time_to_first_token > 0


async def test_different_topics_get_their_own_answers(fresh):
    engine, handle = fresh
    _, france = await collect(engine, handle, chat("t-1", ("user", "Which city is the capital of France?")))
    _, sky = await collect(engine, handle, chat("t-2", ("user", "What colour is the sky on a clear day?")))
    assert france.text != sky.text
    assert "Paris" in france.text and "Paris" not in sky.text
    assert "blue" in sky.text.lower()


async def test_max_tokens_gives_length(engine, handle):
    _, r = await collect(engine, handle, chat("len", ("user", "Tell me a long story about a dragon."), max_tokens=5, stop=[]))
    assert r.finish_reason == "length" and r.tokens == 5


async def test_eos_gives_stop(engine, handle):
    _, r = await collect(engine, handle, chat("eos", ("user", "Which city is the capital of France?"), max_tokens=40, stop=[]))
    assert r.finish_reason == "stop" and r.tokens < 40


async def test_stop_sequence_cuts_the_text(engine, handle):
    q = ("user", "Tell me a long story about a dragon.")
    _, free = await collect(engine, handle, chat("s-1", q, max_tokens=30, stop=[]))
    words = free.text.split()
    assert len(words) > 8
    stop = " " + words[6]
    cut = free.text[: free.text.index(stop)]
    chunks, r = await collect(engine, handle, chat("s-2", q, max_tokens=30, stop=[stop]))
    assert r.finish_reason == "stop_sequence"
    assert r.text == cut


async def test_raw_prompt_completion(engine, handle):
    req = GenerateRequest("raw", sampling(max_tokens=8, stop=[]), prompt="The capital of France is")
    _, r = await collect(engine, handle, req)
    assert r.tokens > 0 and r.text.strip()


async def test_cancel_keeps_partial_text(engine, handle):
    req = chat("cancel-me", ("user", "Tell me a long story."), max_tokens=400, stop=[], ignore_eos=True)
    chunks: list[TokenChunk] = []
    result = None
    async for item in engine.generate_stream(handle, req):
        if isinstance(item, GenerationResult):
            result = item
        else:
            chunks.append(item)
            if len(chunks) == 3:
                assert await engine.cancel("cancel-me") is True
    assert result is not None and result.finish_reason == "cancelled" and result.cancelled
    assert 3 <= result.tokens < 400
    assert result.text == "".join(c.text for c in chunks)
    assert await engine.cancel("cancel-me") is False


async def test_cancelling_the_consumer_stops_the_worker(engine, handle):
    req = chat("abandon", ("user", "Tell me a long story."), max_tokens=2000, stop=[], ignore_eos=True)
    first = asyncio.Event()

    async def consume():
        async for item in engine.generate_stream(handle, req):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The worker is free again: a short request completes (it would queue behind 2000 tokens otherwise,
    # but there are free slots anyway, so also check the slot was released).
    _, r = await collect(engine, handle, chat("after", ("user", "Say hi."), max_tokens=4))
    assert r.tokens > 0
    # the worker reports its slots after every generation: the abandoned one is no longer running
    model = engine.diagnostics()["models"][0]
    assert model["worker"]["generations"] == 0
    assert not any(s["busy"] for s in model["worker"]["slots"])


async def test_conversation_reuses_the_prefix(engine, handle):
    t1 = [("system", "You are terse."), ("user", "Name a fruit.")]
    _, r1 = await collect(engine, handle, chat("c-1", *t1, conversation="topic-fruit", max_tokens=8))
    t2 = [*t1, ("assistant", r1.text), ("user", "Name another one.")]
    _, r2 = await collect(engine, handle, chat("c-2", *t2, conversation="topic-fruit", max_tokens=8))
    assert r2.usage.cached_tokens >= r1.usage.prompt_tokens - 1
    assert r2.usage.cached_tokens < r2.usage.prompt_tokens
    # same prompt again: everything but the last token is cached
    _, r3 = await collect(engine, handle, chat("c-3", *t2, conversation="topic-fruit", max_tokens=8))
    assert r3.usage.cached_tokens == r3.usage.prompt_tokens - 1
    assert r3.text == r2.text


async def test_long_history_is_fitted_not_fatal(engine, handle):
    filler = "This is an old message about nothing in particular. " * 30
    turns = []
    for i in range(6):
        turns += [("user", f"{i}: {filler}"), ("assistant", f"Noted {i}.")]
    turns.append(("user", "Which city is the capital of France?"))
    _, r = await collect(engine, handle, chat("fit", *turns, max_tokens=16))
    assert r.usage.prompt_tokens <= 512 - 16
    assert r.tokens > 0
    huge = ("user", "Please summarise: " + "lorem ipsum dolor sit amet " * 400 + " END.")
    _, r = await collect(engine, handle, chat("huge", huge, max_tokens=8))
    assert r.usage.prompt_tokens <= 512 - 8 and r.tokens > 0


async def test_concurrent_generations_share_the_context(fresh):
    engine, handle = fresh
    qs = ["Which city is the capital of France?", "What colour is the sky on a clear day?", "Name a fruit."]
    results = await asyncio.gather(
        *(collect(engine, handle, chat(f"par-{i}", ("user", q), max_tokens=24)) for i, q in enumerate(qs))
    )
    france, sky, fruit = (r for _, r in results)
    # each sequence keeps its own answer (batched decoding changes float summation order, so the
    # texts need not be byte-identical to solo runs; the topics must not bleed into each other)
    assert "Paris" in france.text and "Paris" not in sky.text + fruit.text
    assert "blue" in sky.text and "blue" not in france.text
    assert len({france.text, sky.text, fruit.text}) == 3
    slots = engine.diagnostics()["models"][0]["worker"]["slots"]
    assert sum(1 for s in slots if s["tokens"] > 0) >= 3


async def test_more_requests_than_slots_queue(engine, handle):
    reqs = [chat(f"q-{i}", ("user", f"Count to {i + 2}."), max_tokens=6) for i in range(7)]
    results = await asyncio.gather(*(collect(engine, handle, r) for r in reqs))
    assert all(r.tokens > 0 for _, r in results)
    assert max(r.timing.queue_time for _, r in results) > 0


async def test_waiting_requests_start_when_every_slot_ends_in_the_same_step(engine, handle):
    """Regression: the worker used to block on its command queue whenever nothing was active, even with
    requests waiting for a slot, so when all running sequences ended in one step the rest hung forever.

    With ``max_tokens`` 1 and short prompts, every admitted group is prefilled, sampled and finished in a
    single decode step; 4 slots and 17 requests leave requests waiting after such a step every time."""
    reqs = [chat(f"same-step-{i}", ("user", f"Say {i}."), max_tokens=1) for i in range(17)]
    results = await asyncio.wait_for(asyncio.gather(*(collect(engine, handle, r) for r in reqs)), 120)
    assert len(results) == len(reqs)
    assert all(r.tokens == 1 and r.finish_reason in ("length", "stop") for _, r in results)
    assert max(r.timing.queue_time for _, r in results) > 0  # some really waited for a slot


async def test_watchdog_every_request_ends_under_a_random_mix(engine, handle):
    """Short and long requests, some conversations, cancels while queued and while running, four times
    more requests than slots: every request ends (completed or cancelled) within the bound."""
    import random

    rng = random.Random(20261204)
    outcomes: dict[str, str] = {}

    async def one(i: int) -> None:
        conv = f"wd-{rng.randrange(3)}" if rng.random() < 0.3 else None
        req = chat(f"wd-{i}", ("user", f"Tell me about {i}."), conversation=conv,
                   max_tokens=rng.choice([1, 2, 5, 24]), ignore_eos=rng.random() < 0.5)
        cancel_after = rng.choice([None, None, 0, 1, 3])  # chunks seen before the consumer walks away
        seen = 0
        async with contextlib.aclosing(engine.generate_stream(handle, req)) as stream:
            async for item in stream:
                if isinstance(item, GenerationResult):
                    outcomes[req.request_id] = item.finish_reason
                    return
                seen += 1
                if cancel_after is not None and seen > cancel_after:
                    outcomes[req.request_id] = "walked-away"
                    return
            outcomes[req.request_id] = "ended-without-result"

    async def cancel_some() -> None:
        for i in rng.sample(range(24), 6):  # cancels by id, queued or running, some after they ended
            await engine.cancel(f"wd-{i}")
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(24)), cancel_some()), 180)
    assert len(outcomes) == 24
    assert "ended-without-result" not in outcomes.values()
    # The worker is still healthy: a fresh request completes.
    _, r = await asyncio.wait_for(collect(engine, handle, chat("wd-after", ("user", "Hi"), max_tokens=3)), 60)
    assert r.tokens > 0


@pytest.mark.parametrize(
    ("kw", "field"),
    [({"temperature": -1.0}, "sampling.temperature"), ({"top_p": 0.0}, "sampling.topP"), ({"max_tokens": 0}, "sampling.maxTokens")],
)
async def test_bad_sampling_is_bad_request_naming_the_field(engine, handle, kw, field):
    s = msgspec.structs.replace(sampling(), **kw)
    with pytest.raises(LamaError) as exc:
        await engine.generate(handle, GenerateRequest("bad", s, prompt="hi"))
    assert exc.value.code == ErrorCode.BAD_REQUEST
    assert exc.value.details["field"] == field


async def test_bad_request_shapes(engine, handle):
    with pytest.raises(LamaError, match="exactly one") as exc:
        await engine.generate(handle, GenerateRequest("x", sampling(), prompt="hi", messages=(ChatTurn("user", "a"),)))
    assert exc.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(LamaError) as exc:
        await engine.generate(handle, GenerateRequest("x", sampling()))
    assert exc.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(LamaError) as exc:
        await engine.generate(handle, GenerateRequest("", sampling(), prompt="hi"))
    assert exc.value.details["field"] == "request_id"


async def test_same_config_shares_one_worker(engine, handle, model_path):
    h2 = await engine.initialize(ModelConfig(str(model_path), **CONFIG))
    assert h2 != handle
    d = engine.diagnostics()
    assert d["workers"] == 1 and d["handles"] == 2
    await engine.release(h2)
    with pytest.raises(LamaError) as exc:
        await engine.release(h2)
    assert exc.value.code == ErrorCode.NOT_FOUND
    _, r = await collect(engine, handle, chat("still", ("user", "Hi"), max_tokens=3))
    assert r.tokens > 0


async def test_diagnostics(engine, handle):
    d = engine.diagnostics()
    m = d["models"][0]
    assert m["worker"]["alive"] and m["worker"]["pid"] > 0
    assert m["worker"]["rssBytes"] > 50 << 20
    assert m["gpu"]["nGpuLayersRequested"] == 1
    if not d["build"]["supportsGpuOffload"]:
        assert m["gpu"]["nGpuLayersUsed"] == 0 and "GPU" in m["gpu"]["reasonNoGPU"]
    assert m["context"]["nCtxPerSequence"] >= 512 and m["context"]["nSeqMax"] == 4
    assert m["context"]["chatTemplate"] == "gguf"
    assert m["memory"]["predicted"]["totalBytes"] > m["memory"]["predicted"]["weightsBytes"] > 0
    assert "AMX_INT8 = 1" not in d["build"]["systemInfo"]


async def test_cancel_while_queued_and_while_running(engine, handle):
    """Four streams fill the four slots; a fifth waits in the worker's queue and is cancelled there."""
    started = [asyncio.Event() for _ in range(4)]

    async def run(i: int):
        req = chat(f"busy-{i}", ("user", f"Story number {i}."), max_tokens=300, stop=[], ignore_eos=True)
        result = None
        async for item in engine.generate_stream(handle, req):
            if isinstance(item, GenerationResult):
                result = item
            else:
                started[i].set()
        return result

    busy = [asyncio.create_task(run(i)) for i in range(4)]
    for ev in started:
        await ev.wait()
    queued = asyncio.create_task(engine.generate(handle, chat("queued", ("user", "Hi"), max_tokens=5)))
    await asyncio.sleep(0)  # let it submit (ordering only, not timing: the request is sent synchronously)
    assert await engine.cancel("queued") is True
    r = await queued
    assert r.finish_reason == "cancelled" and r.tokens == 0 and r.text == ""
    for i in range(4):
        assert await engine.cancel(f"busy-{i}")
    results = await asyncio.gather(*busy)
    assert all(x.finish_reason == "cancelled" and 0 < x.tokens < 300 for x in results)


async def test_anyio_cancel_scope_stops_generation(engine, handle):
    import anyio

    req = chat("anyio-cancel", ("user", "Tell me a long story."), max_tokens=2000, stop=[], ignore_eos=True)
    got = 0
    with anyio.CancelScope() as scope:
        async with contextlib.aclosing(engine.generate_stream(handle, req)) as stream:
            async for _ in stream:
                got += 1
                if got == 2:
                    scope.cancel()
                    await anyio.sleep(0)  # a checkpoint: the cancellation is delivered here
    assert scope.cancelled_caught and got == 2
    _, r = await collect(engine, handle, chat("after-anyio", ("user", "Say hi."), max_tokens=3))
    assert r.tokens > 0
    slots = engine.diagnostics()["models"][0]["worker"]["slots"]
    assert not any(s["busy"] for s in slots)


async def _converse(engine: Engine, handle: str, conversation: str, users: list[str], max_tokens: int = 12):
    """Feed the engine's own replies back as assistant turns, the way the assistant does."""
    turns: list[tuple[str, str]] = [("system", "You are a helpful assistant.")]
    results: list[GenerationResult] = []
    for i, user in enumerate(users):
        turns.append(("user", user))
        _, r = await collect(
            engine, handle, chat(f"{conversation}-{i}", *turns, conversation=conversation, max_tokens=max_tokens, stop=[])
        )
        results.append(r)
        turns.append(("assistant", r.text))
    return results


async def test_conversation_turns_evaluate_only_the_new_turn(engine, handle):
    """Each follow-up turn reuses everything the slot holds: the previous prompt and the previous reply's tokens
    as generated (a reply cut by max tokens leaves its last sampled token undecoded: that one is re-evaluated)."""
    users = [f"Tell me fact number {i + 1} about the ocean." for i in range(5)]
    results = await _converse(engine, handle, "topic-ocean-facts", users)
    new_turn_tokens = 40  # the user message (~12 tokens) plus the template's end/start markers and role names
    for prev, r in zip(results, results[1:]):
        assert r.usage.cached_tokens >= prev.usage.prompt_tokens + prev.usage.completion_tokens - 2, (prev.usage, r.usage)
        assert r.usage.cached_tokens < r.usage.prompt_tokens
        assert r.usage.prompt_tokens - r.usage.cached_tokens <= new_turn_tokens, r.usage


async def test_conversation_is_deterministic_across_engines(model_path: Path):
    users = ["Name a fruit.", "Name another one.", "Which of the two is sweeter?"]
    texts = []
    for _ in range(2):
        async with Engine() as e:
            h = await e.initialize(ModelConfig(str(model_path), **CONFIG))
            texts.append([r.text for r in await _converse(e, h, "topic-fruit-det", users)])
    assert all(t.strip() for t in texts[0]), texts[0]
    assert texts[0] == texts[1]


async def test_flash_attention_off_loads_and_answers(model_path: Path):
    # Off is the choice for long conversations on CPU (docs/operations.md); it changes the KV layout,
    # so it must load and answer like the default does.
    async with Engine() as e:
        h = await e.initialize(ModelConfig(str(model_path), **{**CONFIG, "flash_attention": "off"}))
        _, r = await collect(e, h, chat("fa-off", ("user", "Which city is the capital of France?")))
        config = e.diagnostics()["models"][0]["config"]
    assert "Paris" in r.text
    assert config["flashAttention"] == "off"


async def test_a_reader_that_falls_behind_gets_the_waiting_tokens_as_one_chunk(engine, handle):
    """The reader takes the first chunk, then nothing until the worker has finished: the rest comes as one
    chunk (not one per token), with every character, and then the result."""
    req = chat("behind", ("user", "Tell me a long story about a dragon."), max_tokens=40, ignore_eos=True, stop=[])
    stream = engine.generate_stream(handle, req)
    first = await anext(stream)
    assert isinstance(first, TokenChunk)
    [(worker, st)] = engine._running["behind"]
    for _ in range(6000):  # until the worker's Done has been queued behind the chunks (at most 60 s)
        if st.gid not in worker.gens:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the generation did not finish")
    rest = [item async for item in stream]
    assert len(rest) == 2 and isinstance(rest[0], TokenChunk) and isinstance(rest[1], GenerationResult)
    result = rest[1]
    assert result.tokens == 40 and first.text + rest[0].text == result.text
