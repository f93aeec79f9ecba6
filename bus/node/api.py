"""The endpoints of the ``lamabus`` micro service (``<prefix>.api.*``); docs/api.md describes each.

Requests and replies are the Structs of :mod:`wire.api`. Every handler runs
behind :func:`bus.node.service.boundary`, so what it raises comes back as a coded
error reply. Long handlers (pull, import, load, the ``llm`` calls) are
``concurrent``: one slow request never holds up the next.

``llm.*`` is the seed's native-module API (initialize / generate /
generateStream / release) over the bus; its sessions live in
handlers/llm_sessions.py, and this module only publishes a stream's chunks.

Several nodes serve this API in one queue group, and each serves it again on
its own subjects, ``<prefix>.api.node.<nodeId>.*`` (bus/service.serve_node).
A handle names its node (``<nodeId>:<opaque>``): a request on it that reaches
another node through the queue group is handed to the handle's node over the
bus; if that node is gone, the answer is ``not_found`` naming it. ``llm.cancel``
names only a request id: a node that is not running it asks the other live
nodes. ``models.load``/``unload``, ``diagnostics`` and ``metrics`` concern the
node that answers, and say which node that is; ask a given node on its subjects.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import time
from typing import Any, Awaitable, Callable, Iterable, Protocol

import anyio
import msgspec

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from bus.client import raise_for_error
from bus.node.service import ERROR_COUNTS, Endpoint
from bus.subjects import Subjects
from engine.runtime import Engine
from handlers.catalog import list_catalog, pull
from handlers.llm_sessions import LlmSessions, node_of_handle
from handlers.models_runtime import ModelsRuntime
from handlers.quotas import Quotas
from handlers.model_files import ProgressCallback
from handlers.registry import Registry
from wire.api import (
    ENDPOINTS,
    ApiDiagnostics,
    ApiRequest,
    endpoint_for,
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
    ServiceDiagnostics,
    TopicAnalysisSet,
    TopicBind,
    TopicCreate,
    TopicGet,
    TopicList,
    TopicListReply,
    TopicReply,
    TopicUpdate,
)
from wire.decoding import decode_untrusted
from wire.errors import ErrorCode, LamaError
from wire.messages import encode


class MetricsSource(Protocol):
    def exposition(self) -> tuple[bytes, str]: ...

PROGRESS_INTERVAL = 0.1
"""Seconds between two progress events of one pull/import (the last one is always sent)."""

FORWARD_TIMEOUT = 900.0
"""Seconds a request handed to another node (on a handle it holds) may take: a whole generation."""
NODE_WATCH_INTERVAL = 1.0
"""Seconds between two looks at whether the node a request was handed to is still alive."""


def _bad(message: str, field: str, **details: Any) -> LamaError:
    return LamaError(ErrorCode.BAD_REQUEST, message, field=field, **details)


class Api:
    """The handlers; one per service, given what they work with (never the service itself).

    ``llm``: this API's own llm handles and generations (handlers/llm_sessions.py).
    ``service_diagnostics``: the service's own part of ``diagnostics`` (url, intake, assistant, engine).
    """

    def __init__(self, *, registry: Registry, models: ModelsRuntime, engine: Engine, nc: Client, prefix: str,
                 service_diagnostics: Callable[[], Awaitable[ServiceDiagnostics]],
                 metrics: MetricsSource | None = None, node_id: str | None = None,
                 nodes: Callable[[], Iterable[str]] = lambda: (), local: bool = False,
                 quotas: Quotas | None = None) -> None:
        """``node_id``: this node (handles carry it); ``nodes``: the live nodes of the cluster, as this node
        sees them; ``local``: the table of this node's own subjects, which never hands a request on;
        ``quotas``: the per-author limits on ``llm.generate`` (shared with the topic assistant)."""
        self.registry = registry
        self.models = models
        self.engine = engine
        self.nc = nc
        self.prefix = prefix
        self.service_diagnostics = service_diagnostics
        self.metrics_source = metrics
        self.node_id = node_id
        self.nodes = nodes
        self.local = local
        self.llm = LlmSessions(registry, engine, node_id=node_id, quotas=quotas)
        self._subjects = Subjects(prefix)

    def on_own_subjects(self) -> "Api":
        """The same handlers and state, for ``<prefix>.api.node.<nodeId>.*``: answers, never hands on."""
        twin = copy.copy(self)
        twin.local = True
        return twin

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

    # ------------------------------------------------------------------ routing to a node

    def _elsewhere(self, handle: str) -> str | None:
        """The node that holds ``handle`` when it is another node and this table may hand requests on."""
        node = node_of_handle(handle)
        return node if node is not None and node != self.node_id and not self.local else None

    async def _forward(self, node: str, request: ApiRequest[Any], reply_type: type[Any],
                       timeout: float = FORWARD_TIMEOUT) -> Any:
        """Ask ``node`` on its own subjects; its coded error is raised here as it came. A node that dies
        while it answers (its heartbeat gone from the cluster's bucket) ends the wait with ``not_found``."""
        spec = endpoint_for(request)
        subject = spec.subject(self._subjects.node_api(node))
        outcome: list[Any] = []
        with anyio.CancelScope() as watching:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_node, node, watching)
                try:
                    outcome.append(await self.nc.request(subject, encode(request), timeout=timeout))
                except Exception as exc:  # judged below, outside the task group
                    outcome.append(exc)
                tg.cancel_scope.cancel()
        if not outcome:
            raise LamaError(ErrorCode.NOT_FOUND, f"node {node} stopped while it answered {spec.name}; what it "
                            "held is gone with it", node=node)
        reply = outcome[0]
        if isinstance(reply, NoRespondersError):
            raise LamaError(ErrorCode.NOT_FOUND, f"node {node} is not serving (it stopped, or is not a node of "
                            "this service); what it held is gone with it", node=node)
        if isinstance(reply, NatsTimeoutError):
            raise LamaError(ErrorCode.TIMEOUT, f"node {node} did not answer {spec.name} within {timeout:g}s",
                            node=node)
        if isinstance(reply, Exception):
            raise reply
        raise_for_error(reply)
        return decode_untrusted(_decoder(reply_type), reply.data)

    async def _watch_node(self, node: str, scope: anyio.CancelScope) -> None:
        """Cancel ``scope`` once ``node`` is no longer among the live nodes (never on a single node)."""
        while True:
            await anyio.sleep(NODE_WATCH_INTERVAL)
            live = set(self.nodes())
            if live and node not in live:
                scope.cancel()
                return

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
        return ModelLoadReply(model_id=loaded.model_id, loaded=self._loaded(), node=self.node_id)

    async def models_unload(self, req: ModelUnload) -> ModelUnloadReply:
        await self.registry.get_model(req.model_id)  # model_not_found for an id never registered
        was_loaded = await self.models.unload(req.model_id)
        return ModelUnloadReply(model_id=req.model_id, was_loaded=was_loaded, loaded=self._loaded(), node=self.node_id)

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

    async def topics_analysis(self, req: TopicAnalysisSet) -> TopicReply:
        return TopicReply(topic=await self.registry.set_topic_analysis(req.topic_id, req.enabled))

    async def topics_bind(self, req: TopicBind) -> TopicReply:
        return TopicReply(topic=await self.registry.bind_topic(req.topic_id, req.model_id))

    # ------------------------------------------------------------------ llm (sessions live in handlers/)

    async def llm_initialize(self, req: LlmInitialize) -> LlmHandle:
        return await self.llm.initialize(req)

    async def llm_generate(self, req: LlmGenerate) -> LlmResult:
        if (node := self._elsewhere(req.handle)) is not None:
            return await self._forward(node, req, LlmResult)
        return await self.llm.generate(req)

    async def llm_generate_stream(self, req: LlmGenerateStream) -> LlmResult:
        if (node := self._elsewhere(req.handle)) is not None:
            self._check_subject(req.subject, "$.subject")
            return await self._forward(node, req, LlmResult)  # that node publishes the chunks to req.subject
        nc = self.nc
        self._check_subject(req.subject, "$.subject")

        async def publish(token: LlmToken) -> None:
            await nc.publish(req.subject, encode(token))

        run = self.llm.prepare(req)  # a refusal is the requester's alone: nothing goes to the subject
        try:
            reply = await self.llm.generate(run, on_token=publish)
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
                await nc.publish(req.subject, encode(LlmFailed(request_id=run.client_id, error=err.to_body())))
            raise

    async def llm_cancel(self, req: LlmCancel) -> LlmCancelReply:
        if self.local or req.request_id in self.llm.running:
            return await self.llm.cancel(req)
        # A request id does not name its node: the one running it says so; the others say not_found.
        for node in sorted(set(self.nodes()) - {self.node_id}):
            try:
                return await self._forward(node, req, LlmCancelReply, timeout=5.0)
            except LamaError as exc:
                if exc.code not in (ErrorCode.NOT_FOUND, ErrorCode.TIMEOUT):
                    raise
        return await self.llm.cancel(req)  # not_found, said by this node

    async def llm_release(self, req: LlmRelease) -> LlmReleased:
        if (node := self._elsewhere(req.handle)) is not None:
            return await self._forward(node, req, LlmReleased)
        return await self.llm.release(req)

    # ------------------------------------------------------------------ diagnostics

    async def diagnostics(self, _: DiagnosticsGet) -> Diagnostics:
        return Diagnostics(
            service=await self.service_diagnostics(),
            registry=await self.registry.diagnostics(self._loaded()),
            api=ApiDiagnostics(llm_handles=sorted(self.llm.handles), llm_running=sorted(self.llm.running),
                               errors=dict(sorted(ERROR_COUNTS.items()))),
        )

    async def metrics(self, _: MetricsGet) -> MetricsReply:
        if self.metrics_source is None:
            raise LamaError(ErrorCode.NOT_FOUND, "metrics are off on this node (metrics = \"off\")")
        body, content_type = self.metrics_source.exposition()
        return MetricsReply(content_type=content_type, text=body.decode(), node=self.node_id)

    # ------------------------------------------------------------------ the table

    def endpoints(self) -> list[Endpoint]:
        """wire.api's table, each row bound to its handler: the method named after the endpoint
        (``models.get`` -> ``models_get``)."""
        return [Endpoint.from_spec(spec, getattr(self, spec.name.replace(".", "_"))) for spec in ENDPOINTS]


@functools.cache
def _decoder(reply_type: type) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(reply_type)
