"""``llm.*``: the seed's native-module API (initialize / generate / generateStream / release)
as sessions over the engine, with opaque handles.

Handles made here are this module's own: ``generate`` and ``release`` accept only
those, never the handles the models runtime holds for the assistant. With a node id
(several nodes on a cluster), a handle is ``<nodeId>:<engine handle>``: it names the
node whose engine holds it, and bus/node/api.py hands a request on it to that node. The
bus layer only decodes requests, routes them and publishes a stream's chunks.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Awaitable, Callable, Protocol

import msgspec

from engine.types import ChatTurn, GenerateRequest, GenerationResult, ModelConfig, TokenChunk
from handlers.quotas import Quotas, Ticket
from handlers.registry import Registry
from wire.api import (
    LlmCancel,
    LlmCancelReply,
    LlmGenerate,
    LlmHandle,
    LlmInitialize,
    LlmRelease,
    LlmReleased,
    LlmResult,
    LlmToken,
)
from wire.errors import ErrorCode, LamaError
from wire.params import GenerationParams, SamplingParams

MAX_HANDLES = 32
"""Handles open at once; more is ``busy`` (each may hold a model in memory)."""
ANONYMOUS = "anonymous"
"""The quota author of an ``llm.generate`` request that names none."""


def node_of_handle(handle: str) -> str | None:
    """The node a handle names (``<nodeId>:<opaque>``), or None for a handle of a single node."""
    node, sep, _ = handle.partition(":")
    return node if sep and node else None


class EngineLike(Protocol):
    async def initialize(self, config: ModelConfig) -> str: ...

    async def generate(self, handle: str, request: GenerateRequest) -> GenerationResult: ...

    def generate_stream(self, handle: str, request: GenerateRequest): ...  # noqa: ANN201 - an async iterator

    async def cancel(self, request_id: str) -> bool: ...

    async def release(self, handle: str) -> None: ...


class _Session(msgspec.Struct):
    engine_handle: str
    model_id: str | None
    config: ModelConfig
    params: GenerationParams | None
    created: float


class _Prepared(msgspec.Struct, frozen=True):
    handle: str
    client_id: str
    request: GenerateRequest
    session: _Session
    #: The author's running place (handlers/quotas.py); ``generate`` releases it. None: no quotas.
    ticket: Ticket | None = None


def _bad(message: str, field: str) -> LamaError:
    return LamaError(ErrorCode.BAD_REQUEST, message, field=field)


class LlmSessions:
    """The ``llm.*`` state of one service: open handles and running requests."""

    def __init__(self, registry: Registry, engine: EngineLike, *, node_id: str | None = None,
                 quotas: Quotas | None = None) -> None:
        """``quotas``: the service's per-author limits (shared with the topic assistant); None: no limits."""
        self.registry = registry
        self.engine = engine
        self.node_id = node_id
        self.quotas = quotas
        self.handles: dict[str, _Session] = {}
        self.running: dict[str, str] = {}  # client request id -> engine request id

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

    async def initialize(self, req: LlmInitialize) -> LlmHandle:
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
        engine_handle = await self.engine.initialize(config)
        handle = engine_handle if self.node_id is None else f"{self.node_id}:{engine_handle}"
        self.handles[handle] = _Session(engine_handle=engine_handle, model_id=model_id, config=config, params=params,
                                        created=time.time())
        return LlmHandle(handle=handle, model_id=model_id, model_path=config.model_path, context_size=config.n_ctx,
                         batch_size=config.n_batch, gpu_layers=config.n_gpu_layers, threads=config.n_threads,
                         parallel=config.n_seq_max, node=self.node_id)

    def _session(self, handle: str) -> _Session:
        info = self.handles.get(handle)
        if info is None:
            node = node_of_handle(handle)
            if node is not None and node != self.node_id:
                raise LamaError(ErrorCode.NOT_FOUND, f"handle {handle!r} is held by node {node}, not this one "
                                f"({self.node_id})", handle=handle, node=node, field="$.handle")
            raise LamaError(ErrorCode.NOT_FOUND, f"unknown or released handle {handle!r}", handle=handle,
                            field="$.handle")
        return info

    def _engine_request(self, req: LlmGenerate, info: _Session) -> tuple[str, GenerateRequest]:
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

    def prepare(self, req: LlmGenerate) -> "_Prepared":
        """Check ``req`` (handle, messages, request id, quotas) before anything runs: a refusal raises here.
        What it returns must be given to ``generate``, which releases its quota place."""
        info = self._session(req.handle)
        client_id, request = self._engine_request(req, info)
        ticket = None
        if self.quotas is not None:
            chars = len(req.prompt) if req.prompt is not None else sum(len(t.content) for t in req.messages or ())
            ticket = self.quotas.admit(req.author_id or ANONYMOUS, client_id, prompt_chars=chars,
                                       asked_max_tokens=req.params.max_tokens if req.params is not None else None,
                                       path="llm")
            # Admitted: the cap, on whatever layer set maxTokens (a refusal of the asked value was admit's).
            sampling = request.sampling
            capped = self.quotas.cap(sampling.max_tokens, "llm")
            if capped != sampling.max_tokens:
                sampling = msgspec.structs.replace(sampling, max_tokens=capped)
                request = msgspec.structs.replace(request, sampling=sampling)
        return _Prepared(req.handle, client_id, request, info, ticket)

    async def generate(self, req: LlmGenerate | "_Prepared",
                       on_token: Callable[[LlmToken], Awaitable[None]] | None = None) -> LlmResult:
        """Generate on the request's handle; ``on_token`` hears each chunk (``generate_stream``)."""
        run = req if isinstance(req, _Prepared) else self.prepare(req)
        if run.client_id in self.running:
            if run.ticket is not None:
                run.ticket.release()
            raise LamaError(ErrorCode.CONFLICT, f"request {run.client_id!r} is already running",
                            request_id=run.client_id, field="$.requestId")
        self.running[run.client_id] = run.request.request_id
        try:
            if on_token is None:
                result = await self.engine.generate(run.session.engine_handle, run.request)
            else:
                seq = 0
                streamed: GenerationResult | None = None
                async for item in self.engine.generate_stream(run.session.engine_handle, run.request):
                    if isinstance(item, TokenChunk):
                        await on_token(LlmToken(request_id=run.client_id, seq=seq, text=item.text,
                                                channel=item.channel))
                        seq += 1
                    else:
                        streamed = item
                if streamed is None:
                    raise LamaError(ErrorCode.INTERNAL, "the engine ended a stream without a result")
                result = streamed
        finally:
            self.running.pop(run.client_id, None)
            if run.ticket is not None:
                run.ticket.release()
        return LlmResult(request_id=run.client_id, handle=run.handle, model_id=run.session.model_id, text=result.text,
                         thinking=result.thinking, tokens=result.tokens, finish_reason=result.finish_reason,
                         timing=result.timing, usage=result.usage)

    async def cancel(self, req: LlmCancel) -> LlmCancelReply:
        engine_id = self.running.get(req.request_id)
        if engine_id is None:
            raise LamaError(ErrorCode.NOT_FOUND, f"no running llm request {req.request_id!r}",
                            request_id=req.request_id, field="$.requestId")
        return LlmCancelReply(request_id=req.request_id, cancelled=await self.engine.cancel(engine_id))

    async def release(self, req: LlmRelease) -> LlmReleased:
        info = self._session(req.handle)
        del self.handles[req.handle]
        await self.engine.release(info.engine_handle)
        return LlmReleased(handle=req.handle)
