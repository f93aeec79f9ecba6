"""The endpoints of the ``lamabus`` micro service (``<prefix>.api.*``); docs/api.md describes each.

Requests and replies are the Structs of :mod:`wire.api`. Every handler runs
behind :func:`bus.service.boundary`, so what it raises comes back as a coded
error reply. Long handlers (pull, import, load, the ``llm`` calls) are
``concurrent``: one slow request never holds up the next.

``llm.*`` is the seed's native-module API (initialize / generate /
generateStream / release) over the bus. Handles made here are this module's
own: ``llm.generate`` and ``llm.release`` accept only those, never the handles
the models runtime holds for the assistant (which diagnostics shows).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

import anyio
import msgspec

from nats.aio.client import Client

from bus.service import ERROR_COUNTS, Endpoint
from engine.runtime import Engine
from engine.types import ChatTurn, GenerateRequest, GenerationResult, ModelConfig, TokenChunk
from handlers.catalog import list_catalog, pull
from handlers.models_runtime import ModelsRuntime
from handlers.registry import ProgressCallback, Registry
from wire.api import (
    ENDPOINTS,
    ApiDiagnostics,
    CatalogList,
    CatalogReply,
    LlmCancel,
    LlmCancelReply,
    LlmFailed,
    LlmGenerate,
    LlmGenerateStream,
    LlmHandle,
    LlmInitialize,
    LlmRelease,
    LlmReleased,
    LlmResult,
    LlmToken,
    Diagnostics,
    DiagnosticsGet,
    MetricsGet,
    MetricsReply,
    ModelActivate,
    ModelGet,
    ModelImport,
    ModelListReply,
    ModelLoad,
    ModelLoadReply,
    ModelPull,
    ModelRemove,
    ModelReply,
    ModelsList,
    ModelUnload,
    ModelUnloadReply,
    ModelUpdate,
    Progress,
    TopicBind,
    TopicUpdate,
    TopicCreate,
    TopicGet,
    TopicList,
    TopicListReply,
    TopicReply,
    ServiceDiagnostics,
)
from wire.errors import ErrorCode, LamaError
from wire.messages import encode
from wire.params import GenerationParams, SamplingParams


class MetricsSource(Protocol):
    def exposition(self) -> tuple[bytes, str]: ...

MAX_HANDLES = 32
"""``llm.initialize`` handles open at once; more is ``busy`` (each may hold a model in memory)."""
PROGRESS_INTERVAL = 0.1
"""Seconds between two progress events of one pull/import (the last one is always sent)."""


def _bad(message: str, field: str, **details: Any) -> LamaError:
    return LamaError(ErrorCode.BAD_REQUEST, message, field=field, **details)


class _ApiHandle(msgspec.Struct):
    model_id: str | None
    config: ModelConfig
    params: GenerationParams | None
    created: float


class Api:
    """The handlers; one per service, given what they work with (never the service itself).

    ``handles``/``running``: this API's own llm handles and generations.
    ``service_diagnostics``: the service's own part of ``diagnostics`` (url, intake, assistant, engine).
    """

    def __init__(self, *, registry: Registry, models: ModelsRuntime, engine: Engine, nc: Client, prefix: str,
                 service_diagnostics: Callable[[], Awaitable[ServiceDiagnostics]],
                 metrics: MetricsSource | None = None) -> None:
        self.registry = registry
        self.models = models
        self.engine = engine
        self.nc = nc
        self.prefix = prefix
        self.service_diagnostics = service_diagnostics
        self.metrics_source = metrics
        self.handles: dict[str, _ApiHandle] = {}
        self.running: dict[str, str] = {}  # client request id -> engine request id

    # ------------------------------------------------------------------ plumbing

    def _loaded(self) -> list[str]:
        return self.models.loaded_ids()

    def _check_subject(self, subject: str, field: str) -> None:
        """Refuse subjects that carry lamabus's own traffic: a caller may not publish there through us."""
        prefix = self.prefix
        for reserved in (f"{prefix}.api", f"{prefix}.topic", f"{prefix}.registry.evt"):
            if subject == reserved or subject.startswith(reserved + "."):
                raise _bad(f"{field.removeprefix('$.')} {subject!r} is reserved for lamabus ({reserved}.>); "
                           "use an inbox or a subject of your own", field, subject=subject)

    def _progress(self, subject: str | None, operation: str, ref: str) -> ProgressCallback | None:
        """A thread-safe progress callback that publishes :class:`Progress` on ``subject``, throttled."""
        if subject is None:
            return None
        self._check_subject(subject, "$.progressSubject")
        nc = self.nc
        loop = asyncio.get_running_loop()
        last = [0.0]

        def callback(done: int, total: int | None) -> None:
            now = time.monotonic()
            final = total is not None and done >= total
            if not final and now - last[0] < PROGRESS_INTERVAL:
                return
            last[0] = now
            data = encode(Progress(operation=operation, ref=ref, done=done, total=total))  # type: ignore[arg-type]
            publish = nc.publish(subject, data)
            try:
                asyncio.run_coroutine_threadsafe(publish, loop)  # fire and forget: progress is best effort
            except RuntimeError:  # the loop is closing (the service stops): no one to tell
                publish.close()

        return callback

    # ------------------------------------------------------------------ models

    async def models_list(self, req: ModelsList) -> ModelListReply:
        models = await self.registry.list_models(include_deleted=req.include_deleted)
        return ModelListReply(models=[m for m in models],
                              active_model_id=self.registry.view.active_model_id, loaded=self._loaded())

    async def models_get(self, req: ModelGet) -> ModelReply:
        return ModelReply(model=await self.registry.get_model(req.model_id))

    async def models_import(self, req: ModelImport) -> ModelReply:
        progress = self._progress(req.progress_subject, "import", req.path)
        m = await self.registry.import_model(req.path, req.name, generation=req.generation, load=req.load,
                                             progress=progress, expected_sha256=req.expected_sha256)
        return ModelReply(model=m)

    async def models_pull(self, req: ModelPull) -> ModelReply:
        progress = self._progress(req.progress_subject, "pull", req.ref)
        m = await pull(self.registry, req.ref, progress=progress, name=req.name)
        return ModelReply(model=m)

    async def models_update(self, req: ModelUpdate) -> ModelReply:
        return ModelReply(model=await self.registry.update_model(
            req.model_id, generation=req.generation, load=req.load, reset=req.reset,
            system_prompt=req.system_prompt, expected_version=req.expected_version))

    async def models_activate(self, req: ModelActivate) -> ModelReply:
        return ModelReply(model=await self.registry.activate(req.model_id))

    async def models_remove(self, req: ModelRemove) -> ModelReply:
        return ModelReply(model=await self.models.remove(req.model_id))

    async def models_load(self, req: ModelLoad) -> ModelLoadReply:
        loaded = await self.models.load(req.model_id)
        return ModelLoadReply(model_id=loaded.model_id, loaded=self._loaded())

    async def models_unload(self, req: ModelUnload) -> ModelUnloadReply:
        await self.registry.get_model(req.model_id)  # model_not_found for an id never registered
        was_loaded = await self.models.unload(req.model_id)
        return ModelUnloadReply(model_id=req.model_id, was_loaded=was_loaded, loaded=self._loaded())

    # ------------------------------------------------------------------ catalogue

    async def catalog_list(self, _: CatalogList) -> CatalogReply:
        entries = list_catalog()
        live = {m.id for m in await self.registry.list_models()}
        return CatalogReply(models=[e for e in entries],
                            registered=[e.id for e in entries if e.id in live])

    # ------------------------------------------------------------------ topics

    async def topics_create(self, req: TopicCreate) -> TopicReply:
        info = await self.registry.create_topic(req.topic_id, req.name, req.model_id, req.created_by,
                                                system_prompt=req.system_prompt)
        return TopicReply(topic=info)

    async def topics_get(self, req: TopicGet) -> TopicReply:
        return TopicReply(topic=await self.registry.get_topic(req.topic_id))

    async def topics_list(self, _: TopicList) -> TopicListReply:
        return TopicListReply(topics=[t for t in await self.registry.list_topics()])

    async def topics_update(self, req: TopicUpdate) -> TopicReply:
        return TopicReply(topic=await self.registry.set_topic_system_prompt(req.topic_id, req.system_prompt))

    async def topics_bind(self, req: TopicBind) -> TopicReply:
        return TopicReply(topic=await self.registry.bind_topic(req.topic_id, req.model_id))

    # ------------------------------------------------------------------ llm

    def _model_path(self, model_path: str) -> tuple[str, str | None]:
        """(resolved path, registered model id) for a path: a live model's file, or a file in a model directory."""
        resolved = str(Path(model_path).expanduser().resolve())
        for m in self.registry.view.live_models():
            if m.model_path == resolved:
                return resolved, m.id
        try:
            return str(self.registry.resolve_import_path(model_path)), None
        except LamaError as exc:
            exc.details["field"] = "$.modelPath"
            raise

    async def llm_initialize(self, req: LlmInitialize) -> LlmHandle:
        if (req.model_id is None) == (req.model_path is None):
            raise _bad("give exactly one of modelId (a registered model) or modelPath", "$.modelId")
        if len(self.handles) >= MAX_HANDLES:
            raise LamaError(ErrorCode.BUSY, f"{len(self.handles)} llm handles are open; release one first",
                            handles=len(self.handles), max_handles=MAX_HANDLES)
        params: GenerationParams | None = None
        if req.model_id is not None:
            m = await self.registry.get_model(req.model_id, include_deleted=False)
            model_id: str | None = m.id
            config = ModelConfig.resolve(m.model_path, req.load_params(), m.model_params())
            params = m.generation_params()
        else:
            await self.registry.refresh()
            assert req.model_path is not None
            path, model_id = self._model_path(req.model_path)
            config = ModelConfig.resolve(path, req.load_params())
        handle = await self.engine.initialize(config)
        self.handles[handle] = _ApiHandle(model_id=model_id, config=config, params=params, created=time.time())
        return LlmHandle(handle=handle, model_id=model_id, model_path=config.model_path, context_size=config.n_ctx,
                         batch_size=config.n_batch, gpu_layers=config.n_gpu_layers, threads=config.n_threads,
                         parallel=config.n_seq_max)

    def _handle(self, handle: str) -> _ApiHandle:
        info = self.handles.get(handle)
        if info is None:
            raise LamaError(ErrorCode.NOT_FOUND, f"unknown or released handle {handle!r}", handle=handle,
                            field="$.handle")
        return info

    def _engine_request(self, req: LlmGenerate, info: _ApiHandle) -> tuple[str, GenerateRequest]:
        if (req.messages is None) == (req.prompt is None):
            raise _bad("give exactly one of messages (chat) or prompt (raw completion)", "$.messages")
        if req.messages is not None and not req.messages:
            raise _bad("messages is empty", "$.messages")
        client_id = req.request_id or uuid.uuid4().hex
        if client_id in self.running:
            raise LamaError(ErrorCode.CONFLICT, f"request {client_id!r} is already running", request_id=client_id,
                            field="$.requestId")
        messages = tuple(ChatTurn(t.role, t.content) for t in req.messages or ())
        request = GenerateRequest(request_id=f"api-{uuid.uuid4().hex}",
                                  sampling=SamplingParams.resolve(req.params, info.params),
                                  messages=messages, prompt=req.prompt)
        return client_id, request

    def _result(self, client_id: str, handle: str, info: _ApiHandle, result: GenerationResult) -> LlmResult:
        return LlmResult(request_id=client_id, handle=handle, model_id=info.model_id, text=result.text,
                         thinking=result.thinking, tokens=result.tokens, finish_reason=result.finish_reason,
                         timing=result.timing, usage=result.usage)

    async def llm_generate(self, req: LlmGenerate) -> LlmResult:
        info = self._handle(req.handle)
        client_id, request = self._engine_request(req, info)
        self.running[client_id] = request.request_id
        try:
            result = await self.engine.generate(req.handle, request)
        finally:
            self.running.pop(client_id, None)
        return self._result(client_id, req.handle, info, result)

    async def llm_generate_stream(self, req: LlmGenerateStream) -> LlmResult:
        nc = self.nc
        self._check_subject(req.subject, "$.subject")
        info = self._handle(req.handle)
        client_id, request = self._engine_request(req, info)
        self.running[client_id] = request.request_id
        try:
            seq = 0
            result: GenerationResult | None = None
            async for item in self.engine.generate_stream(req.handle, request):
                if isinstance(item, TokenChunk):
                    await nc.publish(req.subject, encode(LlmToken(request_id=client_id, seq=seq, text=item.text,
                                                                  channel=item.channel)))
                    seq += 1
                else:
                    result = item
            if result is None:
                raise LamaError(ErrorCode.INTERNAL, "the engine ended a stream without a result")
            reply = self._result(client_id, req.handle, info, result)
            await nc.publish(req.subject, encode(reply))
            return reply
        except BaseException as exc:
            # Whoever listens on the subject learns of the failure too, not only the requester.
            if isinstance(exc, LamaError):
                err = exc
            elif isinstance(exc, anyio.get_cancelled_exc_class()):
                err = LamaError(ErrorCode.CANCELLED, "the service is shutting down")
            else:
                err = LamaError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await nc.publish(req.subject, encode(LlmFailed(request_id=client_id, error=err.to_body())))
            raise
        finally:
            self.running.pop(client_id, None)

    async def llm_cancel(self, req: LlmCancel) -> LlmCancelReply:
        engine_id = self.running.get(req.request_id)
        if engine_id is None:
            raise LamaError(ErrorCode.NOT_FOUND, f"no running llm request {req.request_id!r}",
                            request_id=req.request_id, field="$.requestId")
        return LlmCancelReply(request_id=req.request_id, cancelled=await self.engine.cancel(engine_id))

    async def llm_release(self, req: LlmRelease) -> LlmReleased:
        self._handle(req.handle)
        del self.handles[req.handle]
        await self.engine.release(req.handle)
        return LlmReleased(handle=req.handle)

    # ------------------------------------------------------------------ diagnostics

    async def diagnostics(self, _: DiagnosticsGet) -> Diagnostics:
        return Diagnostics(
            service=await self.service_diagnostics(),
            registry=await self.registry.diagnostics(self._loaded()),
            api=ApiDiagnostics(llm_handles=sorted(self.handles), llm_running=sorted(self.running),
                               errors=dict(sorted(ERROR_COUNTS.items()))),
        )

    async def metrics(self, _: MetricsGet) -> MetricsReply:
        if self.metrics_source is None:
            raise LamaError(ErrorCode.NOT_FOUND, "metrics are off on this node (metrics = \"off\")")
        body, content_type = self.metrics_source.exposition()
        return MetricsReply(content_type=content_type, text=body.decode())

    # ------------------------------------------------------------------ the table

    def endpoints(self) -> list[Endpoint]:
        """wire.api's table, each row bound to its handler: the method named after the endpoint
        (``models.get`` -> ``models_get``)."""
        return [Endpoint.from_spec(spec, getattr(self, spec.name.replace(".", "_"))) for spec in ENDPOINTS]
