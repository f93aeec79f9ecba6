"""Saved KV states with the real bundled model (engine/kv_cache.py through the worker, issue 21).

The claim under test: a conversation that lost its slot and comes back gets its history's KV
cells back, byte for byte, from RAM or from disk after a restart, and evaluates only its new
turn; what it then generates is exactly what it would have generated had it kept its slot. A
file on disk that is truncated, corrupt, or not a state this worker can use is deleted and the
prompt evaluated, and the worker lives on.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.kv_files import SUFFIX, encode_header, read_header
from engine.runtime import Engine
from engine.types import ChatTurn, GenerateRequest, GenerationResult, KvCacheConfig, ModelConfig
from handlers.metrics import ServiceMetrics
from wire.params import GenerationParams, SamplingParams

pytestmark = [pytest.mark.model, pytest.mark.asyncio]

CONFIG = dict(n_ctx=512, n_batch=256, n_seq_max=2, n_gpu_layers=0)
SYSTEM = ("system", "You are a helpful assistant.")
TURN1 = ("user", "Name three rivers in Europe and say one thing about each.")
TURN2 = ("user", "Which of them is the longest?")


def request(rid: str, *turns: tuple[str, str], conversation: str) -> GenerateRequest:
    s = SamplingParams.resolve(GenerationParams(temperature=0.0, max_tokens=24))
    s = msgspec.structs.replace(s, stop=())
    return GenerateRequest(rid, s, messages=tuple(ChatTurn(r, c) for r, c in turns),  # type: ignore[arg-type]
                           conversation=conversation)


async def say(engine: Engine, handle: str, rid: str, *turns: tuple[str, str], conversation: str) -> GenerationResult:
    return await engine.generate(handle, request(rid, *turns, conversation=conversation))


def kv_stats(engine: Engine) -> dict[str, int]:
    (m,) = engine.diagnostics()["models"]
    return m["worker"]["kvCache"]


def worker_pid(engine: Engine) -> int:
    (m,) = engine.diagnostics()["models"]
    return m["worker"]["pid"]


async def evict(engine: Engine, handle: str, tag: str) -> None:
    """Two other conversations at once take both slots."""
    await asyncio.gather(*(say(engine, handle, f"{tag}-{c}", SYSTEM, ("user", f"Say hello to {c}."), conversation=c)
                           for c in (f"{tag}-x", f"{tag}-y")))


async def reference(model_path: Path) -> tuple[str, GenerationResult]:
    """Conversation A evaluated afresh, turn by turn, on a new engine without the cache: A keeps its slot.

    The comparison that can be exact. The turn-2 prompt evaluated from nothing in one batch gives
    slightly different cells (llama.cpp's matmuls round differently by batch shape, engine/__init__.py),
    which can flip a near-tied token of a 135M model; a restore gives back the cells the turn-by-turn
    evaluation made, byte for byte, so it must generate exactly what that evaluation does."""
    async with Engine() as engine:
        h = await engine.initialize(ModelConfig(str(model_path), **CONFIG))
        first = await say(engine, h, "a1", SYSTEM, TURN1, conversation="A")
        second = await say(engine, h, "a2", SYSTEM, TURN1, ("assistant", first.text), TURN2, conversation="A")
        assert second.usage.cached_tokens > 0  # resident: its slot gave the history back
        return first.text, second


@pytest.fixture(scope="module")
def resident(model_path: Path) -> tuple[str, GenerationResult]:
    return asyncio.run(reference(model_path))


async def test_a_restored_state_generates_what_the_resident_one_did(model_path: Path, resident) -> None:
    first_text, kept = resident
    async with Engine(kv_cache=KvCacheConfig(ram_bytes=256 << 20)) as engine:
        h = await engine.initialize(ModelConfig(str(model_path), **CONFIG))
        first = await say(engine, h, "a1", SYSTEM, TURN1, conversation="A")
        assert first.text == first_text
        await evict(engine, h, "e")
        before = kv_stats(engine)
        assert before["ramEntries"] >= 1 and before["ramBytes"] > 0  # A's cells left its slot, kept in RAM
        again = await say(engine, h, "a2", SYSTEM, TURN1, ("assistant", first.text), TURN2, conversation="A")
        after = kv_stats(engine)
    assert again.text == kept.text and again.tokens == kept.tokens
    # only the new turn was evaluated: as many tokens came back as the resident slot kept
    assert again.usage.cached_tokens == kept.usage.cached_tokens
    assert after["hits"] == before["hits"] + 1
    assert after["restoredTokens"] - before["restoredTokens"] == again.usage.cached_tokens


async def test_misses_counted_and_metrics_exposed(model_path: Path) -> None:
    async with Engine(kv_cache=KvCacheConfig(ram_bytes=256 << 20)) as engine:
        h = await engine.initialize(ModelConfig(str(model_path), **CONFIG))
        first = await say(engine, h, "a1", SYSTEM, TURN1, conversation="A")
        await evict(engine, h, "e")
        again = await say(engine, h, "a2", SYSTEM, TURN1, ("assistant", first.text), TURN2, conversation="A")
        stats = kv_stats(engine)
        metrics = ServiceMetrics()
        metrics.observe(engine=engine)
        text = metrics.exposition()[0].decode()
    # A, then e-x and e-y each looked for a saved state and found none; A's return found its own
    assert (stats["misses"], stats["hits"]) == (3, 1)
    name = os.path.basename(str(model_path))
    samples = {(x.name, x.labels.get("model")): x.value
               for family in text_string_to_metric_families(text) for x in family.samples}
    assert samples[("lamabus_kv_cache_hits_total", name)] == 1
    assert samples[("lamabus_kv_cache_misses_total", name)] == 3
    assert samples[("lamabus_kv_cache_restored_tokens_total", name)] == again.usage.cached_tokens > 0
    assert samples[("lamabus_kv_cache_ram_bytes", name)] == stats["ramBytes"] > 0


async def test_zero_turns_it_off(model_path: Path) -> None:
    async with Engine(kv_cache=KvCacheConfig(ram_bytes=0)) as engine:
        h = await engine.initialize(ModelConfig(str(model_path), **CONFIG))
        first = await say(engine, h, "a1", SYSTEM, TURN1, conversation="A")
        await evict(engine, h, "e")
        again = await say(engine, h, "a2", SYSTEM, TURN1, ("assistant", first.text), TURN2, conversation="A")
        assert kv_stats(engine) == {}
    # the system prompt's tokens may be shared with a slot; the history is not
    assert again.usage.cached_tokens < 20


def disk(tmp_path: Path) -> KvCacheConfig:
    return KvCacheConfig(ram_bytes=256 << 20, disk_bytes=256 << 20, disk_dir=str(tmp_path / "kv"))


async def first_life(model_path: Path, tmp_path: Path) -> tuple[str, list[Path]]:
    """Turn 1 of A, then a graceful close: the worker writes its resident conversation to disk."""
    async with Engine(kv_cache=disk(tmp_path)) as engine:
        h = await engine.initialize(ModelConfig(str(model_path), **CONFIG))
        first = await say(engine, h, "a1", SYSTEM, TURN1, conversation="A")
    files = sorted((tmp_path / "kv").rglob("*" + SUFFIX))
    assert len(files) == 1
    return first.text, files


async def test_a_restart_restores_from_disk(model_path: Path, tmp_path: Path, resident) -> None:
    _, kept = resident
    first_text, _ = await first_life(model_path, tmp_path)
    async with Engine(kv_cache=disk(tmp_path)) as engine:
        h = await engine.initialize(ModelConfig(str(model_path), **CONFIG))
        again = await say(engine, h, "a2", SYSTEM, TURN1, ("assistant", first_text), TURN2, conversation="A")
        stats = kv_stats(engine)
    assert again.text == kept.text
    assert again.usage.cached_tokens == kept.usage.cached_tokens  # the history came from the file
    assert (stats["hits"], stats["diskReads"], stats["badFiles"]) == (1, 1, 0)


def _garbage_state(f: Path) -> None:
    """The same tokens and a valid header and checksum around bytes that are not a KV state."""
    with open(f, "rb") as fh:
        tokens, _, _, _ = read_header(fh, f.parent.name, f.stat().st_size, None)
    data = bytes(range(256)) * 64
    f.write_bytes(encode_header(f.parent.name, tokens, data) + tokens + data)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not a state"])
async def test_a_damaged_file_is_deleted_and_the_worker_lives(model_path: Path, tmp_path: Path, resident,
                                                              damage: str) -> None:
    first_text, kept = resident
    _, (f,) = await first_life(model_path, tmp_path)
    if damage == "truncated":
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    elif damage == "flipped byte":
        raw = bytearray(f.read_bytes())
        raw[-100] ^= 0xFF
        f.write_bytes(bytes(raw))
    else:
        _garbage_state(f)
    async with Engine(kv_cache=disk(tmp_path)) as engine:
        h = await engine.initialize(ModelConfig(str(model_path), **CONFIG))
        pid = worker_pid(engine)
        again = await say(engine, h, "a2", SYSTEM, TURN1, ("assistant", first_text), TURN2, conversation="A")
        stats = kv_stats(engine)
        assert worker_pid(engine) == pid  # the same worker answered: nothing crashed
        (m,) = engine.diagnostics()["models"]
        assert m["worker"]["restarts"] == 0
    assert again.usage.cached_tokens < 20  # evaluated, not restored
    assert stats["hits"] == 0 and stats["badFiles"] == 1
    assert not f.exists()


async def test_a_restarted_service_restores_a_returning_topic_from_disk(settings) -> None:
    """``serve`` stopped and started on the same data directory: the topic's history comes back from
    <data_dir>/kv-cache, not from evaluating it again."""
    from bus.client import LamabusClient
    from bus.node.app import LamabusService
    from tests.conftest import entered_in_own_task
    from wire.api import DiagnosticsGet
    from wire.messages import GenerationCompleted

    greedy = GenerationParams(temperature=0.0, max_tokens=16, seed=1)

    async def ask(text: str) -> tuple[GenerationCompleted, dict]:
        async with entered_in_own_task(LamabusService(settings)) as svc:
            async with LamabusClient.connect(svc.url, prefix=svc.settings.prefix) as client:
                done = [i async for i in client.ask("back", text, params=greedy)][-1]
                assert isinstance(done, GenerationCompleted)
                (model,) = svc.engine.diagnostics()["models"]
                return done, model["worker"]["kvCache"]

    first, _ = await ask("Name three rivers in Europe.")
    assert list((settings.data_path / "kv-cache").rglob("*" + SUFFIX))  # written when the service stopped
    second, stats = await ask("Which of them is the longest?")
    # the new prompt is the first one, the reply and the new question: all but the question came back
    assert second.usage.cached_tokens >= first.usage.prompt_tokens
    assert (stats["hits"], stats["diskReads"]) == (1, 1)
