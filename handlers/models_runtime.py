"""Which models are loaded: load on demand, keep-alive, least-recently-used eviction.

The seed loaded a model per message and forgot about it; here one owner keeps
the engine handles, so a model is loaded once, shared, and unloaded when idle
or when a newer one needs its room. Every load, unload and failed load is
recorded in the registry (``ModelLoaded``/``ModelUnloaded``/``ModelLoadFailed``),
so ``modelLoaded`` and ``lastInitialized`` in the LLM record are facts.

The engine is a port (:class:`EnginePort`): ``engine.runtime.Engine`` in the
service, a fake in ``tests/test_registry_runtime.py``; the real engine is tested
in the engine's own tests.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import anyio
from anyio.abc import TaskGroup

from engine.types import ModelConfig
from handlers.ports import ModelRef
from handlers.registry import Registry
from domain.projections import LLM
from wire.errors import ErrorCode, LamaError

log = logging.getLogger("lamabus.models")


class EnginePort(Protocol):
    async def initialize(self, config: ModelConfig) -> str: ...

    async def release(self, handle: str) -> None: ...


@dataclass(eq=False)
class LoadedModel:
    model_id: str
    person_id: str
    handle: str
    config: ModelConfig
    loaded_at: float
    last_used: float
    in_use: int = 0


class ModelsRuntime:
    """Owns the engine handles of loaded models. Use as an async context manager.

    ``max_loaded``: models kept loaded at once; loading one more unloads the least
    recently used model that no generation is using (``busy`` if all are in use).
    ``keep_alive``: seconds of idleness before a model is unloaded; 0 = never.
    ``clock``: monotonic seconds (injectable for tests of the idle rule).
    ``on_load``: told ``(model_id, "loaded" | "failed")`` after each load this runtime tries (metrics).
    """

    def __init__(self, registry: Registry, engine: EnginePort, *, max_loaded: int = 2, keep_alive: float = 600.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_load: Callable[[str, str], None] | None = None) -> None:
        if max_loaded < 1:
            raise LamaError(ErrorCode.BAD_REQUEST, "max_loaded must be at least 1", max_loaded=max_loaded)
        self.registry = registry
        self.engine = engine
        self.max_loaded = max_loaded
        self.keep_alive = keep_alive
        self.clock = clock
        self.on_load = on_load or (lambda model_id, outcome: None)
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = anyio.Lock()
        self._changed = anyio.Event()
        self._tg: TaskGroup | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> "ModelsRuntime":
        await self._forget_stale_loads()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._reaper)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        with anyio.CancelScope(shield=True):
            for model_id in list(self._loaded):
                try:
                    await self.unload(model_id, reason="shutdown")
                except Exception:  # shutting down: release what we can, report the rest
                    log.exception("unloading %s at shutdown failed", model_id)

    async def _forget_stale_loads(self) -> None:
        # A crash leaves "loaded" in the log for models no process holds any more.
        await self.registry.refresh()
        for m in list(self.registry.view.models.values()):
            if m.model_loaded and m.id not in self._loaded:
                await self.registry.record_unloaded(m.id, reason="restart")

    def _poke(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    # ------------------------------------------------------------------ queries

    def loaded(self) -> list[LoadedModel]:
        return sorted(self._loaded.values(), key=lambda m: m.last_used)

    def loaded_ids(self) -> list[str]:
        return [m.model_id for m in self.loaded()]

    # ------------------------------------------------------------------ load / use

    async def acquire(self, model: str | ModelRef) -> str:
        """A handle to the model, loading it (and evicting another) if needed."""
        return (await self.load(model)).handle

    @contextlib.asynccontextmanager
    async def use(self, model: str | ModelRef) -> AsyncIterator[LoadedModel]:
        """Hold the model loaded for the block: neither idleness nor eviction unloads it meanwhile."""
        loaded = await self.load(model, pin=True)
        try:
            yield loaded
        finally:
            loaded.in_use -= 1
            loaded.last_used = self.clock()
            self._poke()

    async def load(self, model: str | ModelRef, *, pin: bool = False) -> LoadedModel:
        model_id, config, person_id = await self._wanted(model)
        current = self._loaded.get(model_id)
        if current is not None and current.config == config:
            return self._touch(current, pin)  # the common case takes no lock
        async with self._lock:
            current = self._loaded.get(model_id)
            if current is not None:
                if current.config == config or current.in_use:
                    # Parameters changed under a running generation: the new ones apply at the next load.
                    return self._touch(current, pin)
                await self._unload_locked(current, "reconfigured")
            await self._make_room()
            loaded = await self._load_locked(model_id, person_id, config)
            return self._touch(loaded, pin)

    async def _wanted(self, model: str | ModelRef) -> tuple[str, ModelConfig, str]:
        if isinstance(model, ModelRef):
            return model.model_id, model.config, model.person_id
        m: LLM = await self.registry.get_model(model, include_deleted=False)
        return m.id, ModelConfig.resolve(m.model_path, m.model_params()), m.person_id

    def _touch(self, loaded: LoadedModel, pin: bool) -> LoadedModel:
        loaded.last_used = self.clock()
        if pin:
            loaded.in_use += 1
        self._poke()
        return loaded

    async def _make_room(self) -> None:
        while len(self._loaded) >= self.max_loaded:
            idle = [m for m in self._loaded.values() if not m.in_use]
            if not idle:
                raise LamaError(ErrorCode.BUSY,
                                f"all {len(self._loaded)} loaded models are generating; try again shortly",
                                loaded=sorted(self._loaded), max_loaded=self.max_loaded)
            await self._unload_locked(min(idle, key=lambda m: m.last_used), "evicted")

    async def _load_locked(self, model_id: str, person_id: str, config: ModelConfig) -> LoadedModel:
        started = time.perf_counter()
        try:
            handle = await self.engine.initialize(config)
        except LamaError as exc:
            self.on_load(model_id, "failed")
            await self.registry.record_load_failed(model_id, exc)
            raise
        except Exception as exc:
            self.on_load(model_id, "failed")
            err = LamaError(ErrorCode.MODEL_LOAD_FAILED, f"loading {model_id} failed: {type(exc).__name__}: {exc}",
                            model_id=model_id)
            await self.registry.record_load_failed(model_id, err)
            raise err from exc
        load_ms = (time.perf_counter() - started) * 1000
        now = self.clock()
        loaded = LoadedModel(model_id, person_id, handle, config, loaded_at=now, last_used=now)
        self._loaded[model_id] = loaded
        try:
            await self.registry.record_loaded(model_id, handle, config.n_ctx, load_ms)
        except BaseException:
            # Unrecorded loads would make the log lie; give the handle back.
            del self._loaded[model_id]
            with anyio.CancelScope(shield=True):
                await self.engine.release(handle)
            raise
        self.on_load(model_id, "loaded")
        return loaded

    # ------------------------------------------------------------------ unload

    async def unload(self, model_id: str, reason: str = "requested") -> bool:
        """Unload now (even if a generation holds it: the caller asked). False if it was not loaded."""
        async with self._lock:
            loaded = self._loaded.get(model_id)
            if loaded is None:
                return False
            await self._unload_locked(loaded, reason)
            return True

    async def _unload_locked(self, loaded: LoadedModel, reason: str) -> None:
        del self._loaded[loaded.model_id]
        # Shielded: a release cut short, or one that is not recorded, would leave a handle or the log wrong.
        with anyio.CancelScope(shield=True):
            try:
                await self.engine.release(loaded.handle)
            finally:
                await self.registry.record_unloaded(loaded.model_id, reason)
                self._poke()

    async def remove(self, model_id: str) -> LLM:
        """Unload the model if loaded, then soft-delete it in the registry."""
        await self.unload(model_id, reason="removed")
        return await self.registry.remove(model_id)

    async def reap(self) -> list[str]:
        """Unload models idle longer than ``keep_alive`` and models removed from the registry."""
        now = self.clock()
        view = self.registry.view
        unloaded = []
        async with self._lock:
            for m in list(self._loaded.values()):
                gone = m.model_id not in view.models or view.models[m.model_id].deleted
                idle = self.keep_alive > 0 and not m.in_use and now - m.last_used >= self.keep_alive
                if gone or idle:
                    await self._unload_locked(m, "removed" if gone else "idle")
                    unloaded.append(m.model_id)
        return unloaded

    def _next_deadline(self) -> float | None:
        if self.keep_alive <= 0:
            return None
        idle = [m.last_used for m in self._loaded.values() if not m.in_use]
        return min(idle) + self.keep_alive if idle else None

    async def _reaper(self) -> None:
        while True:
            changed = self._changed
            deadline = self._next_deadline()
            if deadline is None:
                await changed.wait()
            else:
                # The timer itself: wake at the next idle deadline, or earlier if the set of models changes.
                with anyio.move_on_after(max(0.0, deadline - self.clock())):
                    await changed.wait()
            try:
                await self.registry.refresh()
                await self.reap()
            except Exception:  # one failed release must not stop idle unloading for good
                log.exception("idle unload failed")
                await anyio.sleep(1.0)  # back off rather than spin on a persistent failure
