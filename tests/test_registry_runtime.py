"""ModelsRuntime against a fake engine port (the real engine has its own tests)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from domain.mapper import read_stream
from engine.types import ModelConfig
from handlers.models_runtime import ModelsRuntime
from handlers.ports import ModelRef
from handlers.registry import Registry
from tests.test_registry import Clock, write_gguf
from wire.errors import ErrorCode, LamaError
from wire.params import ModelParams


class FakeEngine:
    def __init__(self) -> None:
        self.configs: list[ModelConfig] = []
        self.released: list[str] = []
        self.live: set[str] = set()
        self.fail: BaseException | None = None
        self.gate: anyio.Event | None = None
        self.release_seen = anyio.Event()

    async def initialize(self, config: ModelConfig) -> str:
        self.configs.append(config)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        handle = f"h{len(self.configs)}"
        self.live.add(handle)
        return handle

    async def release(self, handle: str) -> None:
        self.live.remove(handle)
        self.released.append(handle)
        self.release_seen.set()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def registry(tmp_path: Path):
    models = tmp_path / "models"
    async with Registry.open(tmp_path / "r.sqlite3", [models], clock=Clock()) as reg:
        for i, name in enumerate("abc"):
            await reg.import_model(write_gguf(models / f"{name}.gguf", salt=i), name.upper())
        yield reg


async def unload_reasons(reg: Registry, model_id: str) -> list[str]:
    return [e.event.reason for e in await read_stream(reg.store, f"model-{model_id}") if e.type == "model.unloaded"]


async def test_load_once_and_record_it(registry: Registry):
    engine = FakeEngine()
    async with ModelsRuntime(registry, engine, max_loaded=2) as rt:
        h1 = await rt.acquire("a")
        h2 = await rt.acquire("a")
        assert h1 == h2 == "h1" and len(engine.configs) == 1
        assert engine.configs[0].model_path == (await registry.get_model("a")).model_path
        m = await registry.get_model("a")
        assert m.model_loaded and m.last_initialized > 0
        loaded = [e.event for e in await read_stream(registry.store, "model-a") if e.type == "model.loaded"]
        assert [(e.handle, e.n_ctx) for e in loaded] == [("h1", engine.configs[0].n_ctx)]
        assert rt.loaded_ids() == ["a"]
    # Leaving the context unloads everything and says why.
    assert engine.live == set()
    assert not (await registry.get_model("a")).model_loaded
    assert await unload_reasons(registry, "a") == ["shutdown"]


async def test_concurrent_acquires_load_once(registry: Registry):
    engine = FakeEngine()
    engine.gate = anyio.Event()
    handles: list[str] = []
    async with ModelsRuntime(registry, engine) as rt:
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(lambda: _append(handles, rt.acquire("a")))
            await anyio.wait_all_tasks_blocked()
            engine.gate.set()
    assert handles == ["h1"] * 5 and len(engine.configs) == 1


async def _append(out: list, coro) -> None:
    out.append(await coro)


async def test_least_recently_used_is_evicted(registry: Registry):
    engine = FakeEngine()
    clock = FakeClock()
    async with ModelsRuntime(registry, engine, max_loaded=2, clock=clock) as rt:
        await rt.acquire("a")
        clock.now += 1
        await rt.acquire("b")
        clock.now += 1
        await rt.acquire("a")  # a is now the more recently used
        clock.now += 1
        await rt.acquire("c")
        assert sorted(rt.loaded_ids()) == ["a", "c"]
        assert engine.released == ["h2"]
        assert await unload_reasons(registry, "b") == ["evicted"]
        assert not (await registry.get_model("b")).model_loaded


async def test_models_in_use_are_not_evicted(registry: Registry):
    engine = FakeEngine()
    async with ModelsRuntime(registry, engine, max_loaded=1) as rt:
        async with rt.use("a") as loaded:
            assert loaded.in_use == 1
            with pytest.raises(LamaError) as exc:
                await rt.acquire("b")
            assert exc.value.code is ErrorCode.BUSY
            assert rt.loaded_ids() == ["a"] and engine.released == []
        assert loaded.in_use == 0
        await rt.acquire("b")
        assert rt.loaded_ids() == ["b"]


async def test_idle_models_are_unloaded_after_keep_alive(registry: Registry):
    engine = FakeEngine()
    clock = FakeClock()
    async with ModelsRuntime(registry, engine, keep_alive=10, clock=clock) as rt:
        await rt.acquire("a")
        async with rt.use("b"):
            clock.now += 5
            assert await rt.reap() == []
            clock.now += 6
            assert await rt.reap() == ["a"]  # b is idle as long, but in use
        clock.now += 10
        assert await rt.reap() == ["b"]
        assert await unload_reasons(registry, "a") == ["idle"]


async def test_keep_alive_zero_never_unloads(registry: Registry):
    clock = FakeClock()
    async with ModelsRuntime(registry, FakeEngine(), keep_alive=0, clock=clock) as rt:
        await rt.acquire("a")
        clock.now += 10**9
        assert await rt.reap() == [] and rt.loaded_ids() == ["a"]


async def test_the_idle_timer_runs_by_itself(registry: Registry):
    engine = FakeEngine()
    async with ModelsRuntime(registry, engine, keep_alive=0.05) as rt:
        await rt.acquire("a")
        with anyio.fail_after(5):
            await engine.release_seen.wait()  # set by the reaper task's release, not by the test
        assert rt.loaded_ids() == []
    assert await unload_reasons(registry, "a") == ["idle"]


async def test_load_failures_are_recorded(registry: Registry):
    engine = FakeEngine()
    async with ModelsRuntime(registry, engine) as rt:
        engine.fail = LamaError(ErrorCode.OUT_OF_MEMORY, "needs 9 GiB")
        with pytest.raises(LamaError) as exc:
            await rt.acquire("a")
        assert exc.value.code is ErrorCode.OUT_OF_MEMORY
        assert (await registry.get_model("a")).last_error == "out_of_memory: needs 9 GiB"
        engine.fail = RuntimeError("segfault-ish")
        with pytest.raises(LamaError) as exc:
            await rt.acquire("b")
        assert exc.value.code is ErrorCode.MODEL_LOAD_FAILED and "segfault-ish" in exc.value.message
        assert rt.loaded_ids() == []
        engine.fail = None
        await rt.acquire("a")
        assert (await registry.get_model("a")).last_error is None


async def test_changed_load_params_reload_the_model(registry: Registry):
    engine = FakeEngine()
    async with ModelsRuntime(registry, engine) as rt:
        await rt.acquire("a")
        await registry.update_params("a", load=ModelParams(context_size=512))
        handle = await rt.acquire("a")
        assert handle == "h2" and engine.released == ["h1"] and engine.configs[-1].n_ctx == 512
        assert await unload_reasons(registry, "a") == ["reconfigured"]


async def test_remove_unloads_and_removed_models_are_reaped(registry: Registry):
    engine = FakeEngine()
    async with ModelsRuntime(registry, engine) as rt:
        await rt.acquire("a")
        removed = await rt.remove("a")
        assert removed.deleted and engine.released == ["h1"]
        assert await unload_reasons(registry, "a") == ["removed"]
        with pytest.raises(LamaError) as exc:
            await rt.acquire("a")
        assert exc.value.code is ErrorCode.MODEL_NOT_FOUND
        await rt.acquire("b")
        await registry.remove("b")  # behind the runtime's back (another API path)
        assert await rt.reap() == ["b"]
        assert engine.live == set()


async def test_acquire_by_model_ref_uses_its_config(registry: Registry):
    engine = FakeEngine()
    m = await registry.get_model("a")
    ref = ModelRef(model_id="a", person_id=m.person_id, config=ModelConfig(model_path=m.model_path, n_ctx=128))
    async with ModelsRuntime(registry, engine) as rt:
        await rt.acquire(ref)
        assert engine.configs == [ref.config]


async def test_stale_loaded_flags_from_a_dead_process_are_cleared(registry: Registry):
    await registry.record_loaded("c", "h-from-last-run", 2048)
    async with ModelsRuntime(registry, FakeEngine()):
        assert not (await registry.get_model("c")).model_loaded
    assert await unload_reasons(registry, "c") == ["restart"]
