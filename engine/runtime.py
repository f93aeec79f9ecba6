"""The engine: one owner of every loaded model, each in a crash-isolated worker process.

``Engine`` is the only registry of context handles (the seed's
``contextRegistry``). ``initialize`` validates the config, reads the GGUF
header (no weights), predicts memory against what is really available, and
starts (or shares) a worker process that loads the model. Two ``initialize``
calls with the same model file and config share one worker (refcounted by
handle); ``release`` of the last handle stops it.

A worker that dies (native crash, OOM kill, abort on a corrupt file) fails
every generation it held with a clear ``LamaError`` (``model_load_failed``
while loading, ``internal`` while generating); the next request on the same
handle starts a fresh worker and reloads the model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import msgspec

from engine.gguf import ModelInfo, read_model_info
from engine.gpu import GpuProbe, is_host_buffer
from engine.gpu import probe as probe_gpu
from engine.memory import (
    MemoryAvailable,
    MemoryPrediction,
    MemoryProbe,
    available_memory,
    offloadable_layers,
    plan_load,
)
from engine.kv_files import model_sha256
from engine.types import GenerateRequest, GenerationResult, KvCacheConfig, ModelConfig, TokenChunk
from engine.worker_process import GenState, WorkerDied, WorkerProcess, signal_name
from wire.errors import ErrorCode, LamaError
from wire.params import GPU_LAYERS_AUTO, GenerationParams, SamplingParams

log = logging.getLogger("engine")

_request_decoder = msgspec.json.Decoder(GenerateRequest)
_config_decoder = msgspec.json.Decoder(ModelConfig)
_sampling_decoder = msgspec.json.Decoder(GenerationParams)
_json = msgspec.json.Encoder()


class _Model:
    """A loaded model: config, GGUF info, memory prediction, handles, and its (current) worker."""

    def __init__(self, key: tuple[Any, ...], config: ModelConfig, info: ModelInfo, prediction: MemoryPrediction) -> None:
        self.key = key
        self.config = config
        self.info = info
        self.prediction = prediction
        self.available_at_load: MemoryAvailable | None = None
        self.requested_gpu_layers = config.n_gpu_layers
        self.gpu_at_load: GpuProbe | None = None
        self.gpu_note: str | None = None  # why fewer layers than all were planned for the GPU
        self.requested_seq_max = config.n_seq_max
        self.handles: set[str] = set()
        self.worker: WorkerProcess | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self.lock = asyncio.Lock()


class Engine:
    """Async context manager owning every worker process. See the module docstring."""

    def __init__(
        self,
        *,
        worker_python: str = sys.executable,
        memory_probe: MemoryProbe = available_memory,
        load_timeout: float = 120.0,
        llama_log_level: int = 4,
        worker_env: Mapping[str, str] | None = None,
        gpu_probe: Callable[[], Awaitable[GpuProbe]] | None = None,
        gpu_layers: int | None = None,
        kv_cache: KvCacheConfig | None = None,
        token_batch_ms: float = 0.0,
    ) -> None:
        """``memory_probe``: what may be used now (tests pretend it is small). ``llama_log_level``: llama.cpp
        log lines at or above it (ggml levels: 2 info, 3 warn, 4 error) go to the worker's stderr.
        ``worker_env``: extra environment for workers, e.g. ``{"OMP_WAIT_POLICY": "PASSIVE"}`` on a box
        whose cores are oversubscribed (OpenMP's spinning barriers collapse there; on an idle box
        spinning is faster, so it is not the default). ``kv_cache``: where workers keep the KV states of
        conversations that lost their slot (engine/kv_cache.py; None: nowhere). ``token_batch_ms``: the
        longest a decoded token's text waits so that tokens decoded close together stream as one chunk
        (0: every token alone; the service's setting of that name)."""
        self._token_batch_s = token_batch_ms / 1000.0
        self._kv_cache = kv_cache if kv_cache is not None and kv_cache.enabled else None
        # ``gpu_probe``: what GPU a load may use now (default: engine.gpu.probe in a child process; tests
        # pretend). ``gpu_layers``: the service's n_gpu_layers for models whose own is "auto" (None: auto).
        self._gpu_probe = gpu_probe
        self._gpu_known: GpuProbe | None = None  # a probe without devices: the build or the driver, kept
        self._gpu_layers = gpu_layers
        self._python = worker_python
        self._worker_env = dict(worker_env or {})
        self._memory_probe = memory_probe
        self._load_timeout = load_timeout
        self._log_level = llama_log_level
        self._models: dict[tuple[Any, ...], _Model] = {}
        self._handles: dict[str, _Model] = {}
        self._running: dict[str, list[tuple[WorkerProcess, GenState]]] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    async def __aenter__(self) -> "Engine":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            models = list(self._models.values())
            self._models.clear()
            self._handles.clear()
        await asyncio.gather(*(m.worker.close() for m in models if m.worker is not None), return_exceptions=True)

    def _check_open(self) -> None:
        if self._closed:
            raise LamaError(ErrorCode.INTERNAL, "the engine is closed")

    # ---- models -----------------------------------------------------------

    async def model_info(self, path: str) -> ModelInfo:
        """GGUF metadata without loading weights, read off the event loop."""
        return await asyncio.to_thread(read_model_info, path)

    @staticmethod
    def _validate_config(config: ModelConfig) -> ModelConfig:
        if not isinstance(config, ModelConfig):
            raise LamaError(ErrorCode.BAD_REQUEST, "config must be a ModelConfig", field="config")
        try:
            config = _config_decoder.decode(_json.encode(config))
        except msgspec.ValidationError as exc:
            raise LamaError.from_validation(exc) from None
        if not config.model_path:
            raise LamaError(ErrorCode.BAD_REQUEST, "modelPath is empty", field="$.modelPath")
        return config

    async def initialize(self, config: ModelConfig) -> str:
        """Load (or share) a model; return an opaque handle."""
        self._check_open()
        config = self._validate_config(config)
        path = os.path.realpath(config.model_path)
        config = msgspec.structs.replace(config, model_path=path)
        if config.n_gpu_layers == GPU_LAYERS_AUTO and self._gpu_layers is not None:
            config = msgspec.structs.replace(config, n_gpu_layers=self._gpu_layers)
        info = await self.model_info(path)
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns, *msgspec.structs.astuple(config)[1:])
        async with self._lock:
            self._check_open()
            model = self._models.get(key)
            if model is None:
                requested = config
                gpu = await self._gpu() if config.n_gpu_layers != 0 else None
                available = self._memory_probe()
                # RAM and VRAM, layers for "auto", fewer sequences before out_of_memory (engine/memory.py)
                plan = plan_load(info, config, available, gpu)
                config, prediction = plan.config, plan.prediction
                if config.n_seq_max != requested.n_seq_max:
                    log.warning("%s: %d parallel sequences would not fit in %.0f MiB; loading with %d",
                                path, requested.n_seq_max, available.bytes / 2**20, config.n_seq_max)
                model = _Model(key, config, info, prediction)
                model.requested_seq_max = requested.n_seq_max
                model.available_at_load = available
                model.requested_gpu_layers = plan.requested_gpu_layers
                model.gpu_at_load, model.gpu_note = gpu, plan.note
                model.worker = await self._start_worker(model)
                self._models[key] = model
                self._log_gpu(model)
            handle = "ctx-" + secrets.token_hex(12)
            model.handles.add(handle)
            self._handles[handle] = model
        return handle

    async def _kv_config(self, path: str) -> KvCacheConfig | None:
        """The worker's KV cache settings; on disk, states are keyed by the model file's SHA-256
        (read once, remembered by size and mtime under the cache directory; off the event loop)."""
        kv = self._kv_cache
        if kv is None or kv.disk_bytes <= 0 or kv.disk_dir is None:
            return kv
        try:
            digest = await asyncio.to_thread(model_sha256, path, kv.disk_dir)
        except OSError as exc:
            log.warning("%s: no KV states on disk, the model cannot be hashed: %s", path, exc)
            return msgspec.structs.replace(kv, disk_bytes=0) if kv.ram_bytes > 0 else None
        return msgspec.structs.replace(kv, model_sha256=digest)

    async def _gpu(self) -> GpuProbe:
        """What GPU a load may use now. A probe that found no device is kept (a CPU build stays one; a
        broken driver stays broken until a restart); one with devices is asked again (free VRAM moves)."""
        if self._gpu_known is not None:
            return self._gpu_known
        if self._gpu_probe is not None:
            found = await self._gpu_probe()
        else:
            found = await probe_gpu(self._python, self._worker_env)
        if not found.devices:
            self._gpu_known = found
        return found

    def _log_gpu(self, model: _Model) -> None:
        """One line when the GPU did not get what was planned: why, so that a slow CPU load is explained."""
        loaded = model.worker.loaded if model.worker is not None else None
        if loaded is None:
            return
        planned = model.config.n_gpu_layers
        if loaded.gpu_fallback or (planned > 0 and loaded.n_gpu_layers_used == 0):
            log.warning("%s: running on the CPU, not the GPU: %s", model.config.model_path,
                        loaded.reason_no_gpu or "llama.cpp offloaded no layer")
        elif model.requested_gpu_layers != 0 and planned == 0 and model.gpu_note:
            log.info("%s: on the CPU: %s", model.config.model_path, model.gpu_note)
        elif planned > 0:
            log.info("%s: %d of %d layers on %s", model.config.model_path, loaded.n_gpu_layers_used,
                     offloadable_layers(model.info),
                     ", ".join(d.description or d.name for d in loaded.gpu_devices) or "the GPU")

    async def _start_worker(self, model: _Model) -> WorkerProcess:
        kv = await self._kv_config(model.config.model_path)
        worker = WorkerProcess(self._python, model.config, self._log_level, self._worker_env, kv, self._token_batch_s)
        await worker.start(self._load_timeout)
        return worker

    async def _live_worker(self, model: _Model) -> WorkerProcess:
        async with model.lock:
            w = model.worker
            if w is not None and not w.dead:
                return w
            if w is not None:
                model.last_exit = signal_name(w.returncode)
                await w.close()
            model.restarts += 1
            model.worker = None
            self._check_open()
            model.worker = await self._start_worker(model)
            return model.worker

    async def release(self, handle: str) -> None:
        async with self._lock:
            model = self._handles.pop(handle, None)
            if model is None:
                raise LamaError(ErrorCode.NOT_FOUND, f"unknown or released handle {handle!r}", handle=handle)
            model.handles.discard(handle)
            if model.handles:
                return
            self._models.pop(model.key, None)
        if model.worker is not None:
            await model.worker.close()

    def _model_for(self, handle: str) -> _Model:
        model = self._handles.get(handle)
        if model is None:
            raise LamaError(ErrorCode.NOT_FOUND, f"unknown or released handle {handle!r}", handle=handle)
        return model

    # ---- generation ------------------------------------------------------------

    @staticmethod
    def _validate_request(request: GenerateRequest) -> GenerateRequest:
        if not isinstance(request, GenerateRequest):
            raise LamaError(ErrorCode.BAD_REQUEST, "request must be a GenerateRequest", field="request")
        _one_constraint(request.sampling)
        try:
            _sampling_decoder.decode(_json.encode(request.sampling))
        except msgspec.ValidationError as exc:
            err = LamaError.from_validation(exc)
            field = err.details.get("field")
            if field:
                err.details["field"] = "sampling." + field.removeprefix("$.")
            raise err from None
        try:
            request = _request_decoder.decode(_json.encode(request))
        except msgspec.ValidationError as exc:
            raise LamaError.from_validation(exc) from None
        if not request.request_id:
            raise LamaError(ErrorCode.BAD_REQUEST, "request_id is empty", field="request_id")
        if (request.prompt is None) == (not request.messages):
            raise LamaError(
                ErrorCode.BAD_REQUEST, "give exactly one of messages (chat) or prompt (raw completion)", field="messages"
            )
        return request

    async def generate_stream(
        self, handle: str, request: GenerateRequest
    ) -> AsyncIterator[TokenChunk | GenerationResult]:
        """Chunks as they come, then exactly one GenerationResult. Cancelling the consumer stops the worker."""
        self._check_open()
        model = self._model_for(handle)
        request = self._validate_request(request)
        retried = False
        while True:
            worker = await self._live_worker(model)
            st = worker.submit(request)
            entry = (worker, st)
            self._running.setdefault(request.request_id, []).append(entry)
            finished = False
            try:
                while True:
                    item = await st.next()
                    if isinstance(item, WorkerDied):
                        finished = True
                        # The worker died before it took this request on (e.g. it was killed while idle
                        # and we had not noticed yet): run it once more on a fresh worker.
                        if not item.acked and not retried and not worker.closing:
                            retried = True
                            break
                        raise item.error
                    if isinstance(item, LamaError):
                        finished = True
                        raise item
                    if isinstance(item, GenerationResult):
                        finished = True
                        yield item
                        return
                    yield item
            finally:
                running = self._running.get(request.request_id)
                if running is not None:
                    running.remove(entry)
                    if not running:
                        del self._running[request.request_id]
                if not finished:
                    worker.forget(st.gid)

    async def check_sampling(self, handle: str, sampling: SamplingParams) -> None:
        """Raise what a generation with ``sampling`` would fail with before its first token because of
        its grammar or JSON schema (``bad_request`` naming the field); return when it compiles. The
        model's own worker compiles it (a grammar may name the model's tokens), crash-isolated."""
        self._check_open()
        model = self._model_for(handle)
        if sampling.grammar is None and sampling.json_schema is None:
            return
        _one_constraint(sampling)
        worker = await self._live_worker(model)
        st = worker.check(sampling)
        try:
            item = await st.queue.get()
        finally:
            worker.gens.pop(st.gid, None)
        if isinstance(item, WorkerDied):
            raise item.error
        if isinstance(item, LamaError):
            raise item

    async def generate(self, handle: str, request: GenerateRequest) -> GenerationResult:
        result: GenerationResult | None = None
        async for item in self.generate_stream(handle, request):
            if isinstance(item, GenerationResult):
                result = item
        assert result is not None
        return result

    async def cancel(self, request_id: str) -> bool:
        """Ask the worker to stop ``request_id``; its stream ends with finish_reason="cancelled"."""
        sent = False
        for worker, st in self._running.get(request_id, []):
            sent = worker.cancel(st.gid) or sent
        return sent

    # ---- diagnostics ------------------------------------------------------------

    def diagnostics(self) -> dict[str, Any]:
        models = []
        build: dict[str, Any] | None = None
        for m in self._models.values():
            w = m.worker
            loaded = w.loaded if w is not None else None
            if loaded is not None and build is None:
                build = {
                    "llamaCppPython": loaded.llama_cpp_version,
                    "systemInfo": loaded.system_info,
                    "supportsGpuOffload": loaded.supports_gpu_offload,
                }
            models.append(
                {
                    "path": m.config.model_path,
                    "name": m.info.name,
                    "architecture": m.info.architecture,
                    "quantization": m.info.quantization,
                    "config": msgspec.to_builtins(m.config),
                    "nSeqMaxRequested": m.requested_seq_max,
                    "handles": sorted(m.handles),
                    "worker": {
                        "pid": w.pid if w is not None else None,
                        "alive": w is not None and not w.dead,
                        "restarts": m.restarts,
                        "lastExit": m.last_exit,
                        "rssBytes": _rss(w.pid) if w is not None and not w.dead else None,
                        "generations": len(w.gens) if w is not None else 0,
                        "slots": w.stats.slots if w is not None and w.stats is not None else None,
                        "kvMoves": w.stats.kv_moves if w is not None and w.stats is not None else 0,
                        # saved KV states (engine/kv_cache.py): as of the worker's last report
                        "kvCache": w.stats.kv_cache if w is not None and w.stats is not None else {},
                    },
                    "gpu": _gpu_diagnostics(m),
                    "context": {
                        "nCtxPerSequence": loaded.n_ctx_seq if loaded else None,
                        "nSeqMax": loaded.n_seq_max if loaded else None,
                        "nBatch": loaded.n_batch if loaded else None,
                        "nThreads": loaded.n_threads if loaded else None,
                        "chatTemplate": loaded.chat_template_source if loaded else None,
                        "chatTemplateNote": loaded.chat_template_note if loaded else None,
                    },
                    "memory": {
                        # RAM and VRAM for the layers planned (ramBytes, vramBytes, gpuLayers)
                        "predicted": msgspec.to_builtins(m.prediction),
                        "availableAtLoad": msgspec.to_builtins(m.available_at_load) if m.available_at_load else None,
                    },
                    "loadSeconds": loaded.load_seconds if loaded else None,
                }
            )
        return {
            "models": models,
            "workers": sum(1 for m in self._models.values() if m.worker is not None and not m.worker.dead),
            "handles": len(self._handles),
            "build": build,
            "memoryAvailable": msgspec.to_builtins(self._memory_probe()),
        }


def _gpu_diagnostics(m: _Model) -> dict[str, Any]:
    """Layers asked for, planned and really offloaded (llama.cpp's own count), the device, VRAM, why not."""
    w = m.worker
    loaded = w.loaded if w is not None else None
    requested = m.requested_gpu_layers
    devices = list(loaded.gpu_devices) if loaded is not None else []
    buffers = dict(loaded.buffers) if loaded is not None else {}
    used = loaded.n_gpu_layers_used if loaded else None
    reason = loaded.reason_no_gpu if loaded else None
    if loaded is not None and used == 0 and m.config.n_gpu_layers == 0 and m.gpu_note and requested != 0:
        reason = m.gpu_note  # the plan's reason (no device, no layer fits) beats the worker's "n_gpu_layers is 0"
    return {
        "nGpuLayersRequested": "auto" if requested == GPU_LAYERS_AUTO else requested,
        "nGpuLayersPlanned": m.config.n_gpu_layers,
        "nGpuLayersUsed": used,
        "layers": offloadable_layers(m.info),
        "device": ", ".join(d.description or d.name for d in devices) or None,
        "devices": [msgspec.to_builtins(d) for d in devices],
        "vramTotalBytes": sum(d.total_bytes for d in devices) if devices else None,
        "vramFreeBytes": sum(d.free_bytes for d in devices) if devices else None,  # just after the load
        "vramFreeBeforeLoadBytes": m.gpu_at_load.free_bytes if m.gpu_at_load and m.gpu_at_load.devices else None,
        # llama.cpp's own GPU buffers (weights, KV cache, compute), and the drop in free VRAM it caused
        "vramUsedByModelBytes": sum(v for k, v in buffers.items() if not is_host_buffer(k)) if loaded else None,
        "vramFreeDropBytes": loaded.vram_used_bytes if loaded else None,
        "buffers": buffers,
        "fellBackToCpu": bool(loaded.gpu_fallback) if loaded else False,
        "reasonNoGPU": reason,
        "note": m.gpu_note,
    }


def _one_constraint(sampling: SamplingParams) -> None:
    if sampling.grammar is not None and sampling.json_schema is not None:
        raise LamaError(ErrorCode.BAD_REQUEST, "give params.grammar or params.jsonSchema, not both",
                        field="params.grammar")


def _rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
