"""``token_batch_ms`` on the real model: the text of tokens decoded close together goes out as one chunk.

The window is made far longer than any test here (60 s), so what each test sees is decided by the
rule, not by timing: a generation's first text goes at once, its end sends what is held, and so do a
cancel and a prompt joining the batch.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pytest_asyncio

from engine.runtime import Engine
from engine.types import ChatTurn, GenerateRequest, GenerationResult, ModelConfig, TokenChunk
from wire.params import GenerationParams, SamplingParams

pytestmark = [pytest.mark.model, pytest.mark.asyncio(loop_scope="module")]

WINDOW_MS = 60_000.0


def story(rid: str, max_tokens: int, about: str = "a dragon") -> GenerateRequest:
    sampling = SamplingParams.resolve(GenerationParams(temperature=0.0, max_tokens=max_tokens))
    return GenerateRequest(rid, sampling, messages=(ChatTurn("user", f"Tell me a long story about {about}."),),
                           ignore_eos=True)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def batched(model_path: Path):
    async with Engine(token_batch_ms=WINDOW_MS) as engine:
        yield engine, await engine.initialize(ModelConfig(str(model_path), n_ctx=512, n_batch=256, n_seq_max=4))


async def read_all(stream) -> tuple[list[TokenChunk], GenerationResult]:
    chunks: list[TokenChunk] = []
    async for item in stream:
        if isinstance(item, GenerationResult):
            return chunks, item
        chunks.append(item)
    raise AssertionError("the stream ended without a result")


async def test_the_first_text_goes_at_once_and_the_rest_with_the_end(batched):
    engine, handle = batched
    chunks, result = await read_all(engine.generate_stream(handle, story("whole", 40)))
    assert result.tokens == 40 and result.finish_reason == "length"
    assert "".join(c.text for c in chunks) == result.text
    assert len(chunks) == 2, [c.text for c in chunks]  # not one per token: 38 tokens waited in the worker
    assert chunks[0].text and chunks[1].text


async def test_a_cancel_sends_the_held_text(batched):
    engine, handle = batched
    stream = engine.generate_stream(handle, story("cancelled", 400))
    first = await anext(stream)
    assert isinstance(first, TokenChunk)
    assert await engine.cancel("cancelled") is True
    rest, result = await read_all(stream)
    assert result.finish_reason == "cancelled" and result.tokens < 400
    assert first.text + "".join(c.text for c in rest) == result.text  # nothing held was lost


async def test_a_prompt_joining_the_batch_sends_the_held_text_first(model_path: Path):
    """A prompt makes the next step long; the running stream's held text goes out before it, so that text
    waits for the window or a prompt, never for both. Two slots: the newcomer waits until a short
    generation ends, by when the running one has text held."""
    async with Engine(token_batch_ms=WINDOW_MS) as engine:
        handle = await engine.initialize(ModelConfig(str(model_path), n_ctx=512, n_batch=256, n_seq_max=2))
        # read every stream as it comes (a reader that waited would get what is queued merged into one chunk)
        running = asyncio.create_task(read_all(engine.generate_stream(handle, story("running", 60))))
        short = asyncio.create_task(read_all(engine.generate_stream(handle, story("short", 8, about="a cat"))))
        newcomer = asyncio.create_task(read_all(engine.generate_stream(
            handle, story("newcomer", 4, about="the sea and the ships that sail on it"))))
        (_, done_short), (_, joined) = await asyncio.wait_for(asyncio.gather(short, newcomer), 60)
        chunks, result = await asyncio.wait_for(running, 60)
    assert done_short.tokens == 8 and joined.tokens == 4 and result.tokens == 60
    assert joined.usage.prompt_tokens - joined.usage.cached_tokens > 1  # a prompt was evaluated, not copied
    # its first text at once, what it held when the newcomer's prompt came, the rest with its end
    assert len(chunks) == 3, [c.text for c in chunks]
    assert "".join(c.text for c in chunks) == result.text


async def test_without_a_window_each_token_is_sent_when_decoded(model_path: Path):
    """The engine's own default (0): the reader's first chunks come before the generation ends."""
    async with Engine() as engine:
        handle = await engine.initialize(ModelConfig(str(model_path), n_ctx=512, n_batch=256, n_seq_max=2))
        stream = engine.generate_stream(handle, story("alone", 200))
        first, second = await anext(stream), await anext(stream)
        assert isinstance(first, TokenChunk) and isinstance(second, TokenChunk)
        [(worker, st)] = engine._running["alone"]
        assert st.gid in worker.gens, "the second chunk came only once all 200 tokens were decoded"
        await engine.cancel("alone")
        await asyncio.wait_for(read_all(stream), 60)
