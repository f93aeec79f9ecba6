"""Continuous batching: every running stream advances every decode step (no starvation)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine.runtime import Engine
from engine.types import ChatTurn, GenerateRequest, GenerationResult, ModelConfig
from wire.params import GenerationParams, SamplingParams

pytestmark = pytest.mark.model


def long_request(rid: str, question: str) -> GenerateRequest:
    sampling = SamplingParams.resolve(GenerationParams(temperature=0.0, max_tokens=40, stop=[]))
    assert sampling.stop == ()
    return GenerateRequest(rid, sampling, messages=(ChatTurn("user", question),), ignore_eos=True)


async def test_every_running_stream_advances_every_step(model_path: Path):
    questions = ["Tell me about the sea.", "Tell me about mountains.", "Tell me about deserts."]
    arrivals: list[str] = []

    async with Engine() as engine:
        handle = await engine.initialize(ModelConfig(str(model_path), n_ctx=512, n_seq_max=4))

        async def run(rid: str, question: str) -> GenerationResult:
            result = None
            async for item in engine.generate_stream(handle, long_request(rid, question)):
                if isinstance(item, GenerationResult):
                    result = item
                else:
                    arrivals.append(rid)
            assert result is not None
            return result

        results = await asyncio.gather(*(run(f"s{i}", q) for i, q in enumerate(questions)))

    assert all(r.tokens == 40 and r.finish_reason == "length" for r in results)
    ids = [f"s{i}" for i in range(len(questions))]
    # The window in which all three were generating: from the last first chunk to the first last chunk.
    start = max(arrivals.index(i) for i in ids)
    end = min(len(arrivals) - 1 - arrivals[::-1].index(i) for i in ids)
    window = arrivals[start:end + 1]
    assert len(window) > 3 * 10, "the streams hardly overlapped"
    longest_run, run_len = 1, 1
    for prev, cur in zip(window, window[1:]):
        run_len = run_len + 1 if cur == prev else 1
        longest_run = max(longest_run, run_len)
    # One token per running sequence per step; two in a row only where a chunk was held back
    # (an incomplete UTF-8 character) and released with the next one.
    assert longest_run <= 2, window
