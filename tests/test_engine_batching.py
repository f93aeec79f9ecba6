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


def chat_request(rid: str, question: str, max_tokens: int) -> GenerateRequest:
    sampling = SamplingParams.resolve(GenerationParams(temperature=0.0, max_tokens=max_tokens, stop=[]))
    return GenerateRequest(rid, sampling, messages=(ChatTurn("user", question),), ignore_eos=True,
                           conversation=rid)


async def test_a_gap_in_the_running_sequences_is_closed_and_the_moved_one_keeps_its_context(model_path: Path):
    # llama.cpp decodes non-consecutive sequence ids in separate passes over the weights, so when the
    # middle one of three running sequences ends, the worker moves a neighbour's KV into its place.
    # The moved conversation must go on answering its own question from the copied cache.
    async with Engine() as engine:
        handle = await engine.initialize(ModelConfig(str(model_path), n_ctx=512, n_seq_max=4))

        async def run(req: GenerateRequest) -> GenerationResult:
            result = None
            async for item in engine.generate_stream(handle, req):
                if isinstance(item, GenerationResult):
                    result = item
            assert result is not None
            return result

        france, short, sky = await asyncio.gather(
            run(chat_request("france", "Which city is the capital of France?", 40)),
            run(chat_request("short", "Name a fruit.", 2)),
            run(chat_request("sky", "What colour is the sky on a clear day?", 40)),
        )
        worker = engine.diagnostics()["models"][0]["worker"]

    assert short.tokens == 2 and france.tokens == sky.tokens == 40
    assert worker["kvMoves"] >= 1, worker
    assert "Paris" in france.text and "Paris" not in sky.text
    assert "blue" in sky.text.lower() and "blue" not in france.text.lower()
