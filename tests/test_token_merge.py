"""A reader that fell behind the engine gets the chunks already waiting as one (engine.worker_process.GenState.next):
unit tests on a real asyncio queue; tests/test_engine_model.py has the same on the real model."""

from __future__ import annotations

import random

import pytest

from engine.types import GenerationResult, Timing, TokenChunk, Usage
from engine.worker_process import MERGED_CHUNK_MAX, GenState
from wire.errors import ErrorCode, LamaError

RESULT = GenerationResult(text="", thinking="", tokens=0, finish_reason="stop",
                          timing=Timing(0, 0, 0, 0, 0, 0), usage=Usage(0, 0, 0))


async def test_a_reader_that_keeps_up_gets_every_chunk_alone() -> None:
    st = GenState(1, "r")
    for text in ("a", "b"):
        chunk = TokenChunk(text)
        st.queue.put_nowait(chunk)
        assert await st.next() is chunk


async def test_waiting_chunks_come_as_one_per_channel_and_the_end_stays_last() -> None:
    st = GenState(1, "r")
    for item in (TokenChunk("<"), TokenChunk("think", "thinking"), TokenChunk("ing", "thinking"),
                 TokenChunk("Hel"), TokenChunk("lo"), TokenChunk("!"), RESULT):
        st.queue.put_nowait(item)
    got = [await st.next() for _ in range(4)]
    assert got == [TokenChunk("<"), TokenChunk("thinking", "thinking"), TokenChunk("Hello!"), RESULT]
    assert st.queue.empty()


async def test_an_error_behind_chunks_is_not_swallowed() -> None:
    st = GenState(1, "r")
    error = LamaError(ErrorCode.INTERNAL, "boom")
    for item in (TokenChunk("a"), TokenChunk("b"), error):
        st.queue.put_nowait(item)
    assert await st.next() == TokenChunk("ab")
    assert await st.next() is error


async def test_a_merged_chunk_stays_near_its_size_limit() -> None:
    st = GenState(1, "r")
    piece = "x" * 1000
    for _ in range(10):
        st.queue.put_nowait(TokenChunk(piece))
    sizes = []
    while not st.queue.empty() or st._held:
        sizes.append(len((await st.next()).text))  # type: ignore[union-attr]
    assert sum(sizes) == 10_000 and len(sizes) > 1
    assert all(size < MERGED_CHUNK_MAX + len(piece) for size in sizes)


@pytest.mark.parametrize("seed", range(20))
async def test_any_interleaving_keeps_every_character_in_order(seed: int) -> None:
    """A producer and a reader taking turns at random: what the reader gets, joined per channel, is
    exactly what was queued, and the result comes last."""
    rng = random.Random(seed)
    st = GenState(1, "r")
    sent = [TokenChunk(rng.choice(["a", "bc", "ü", "😀", " "]), rng.choice(["content", "thinking"]))
            for _ in range(rng.randrange(1, 200))]
    pending, got = list(sent), []
    while pending or got[-1:] != [RESULT]:
        if pending and rng.random() < 0.6:
            st.queue.put_nowait(pending.pop(0))
            if not pending:
                st.queue.put_nowait(RESULT)
        elif not st.queue.empty() or st._held:
            got.append(await st.next())
    assert got[-1] == RESULT and RESULT not in got[:-1]
    for channel in ("content", "thinking"):
        assert "".join(c.text for c in got[:-1] if c.channel == channel) == \
            "".join(c.text for c in sent if c.channel == channel)
    # Order across channels too: the chunks, split back into characters, are the sent ones in order.
    flat = [(ch, c.channel) for c in got[:-1] for ch in c.text]
    assert flat == [(ch, c.channel) for c in sent for ch in c.text]
