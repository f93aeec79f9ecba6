"""Payloads of the request/reply API (``<prefix>.api.*``), shared by the service and its clients.

A leaf module like the rest of ``wire``: it imports nothing outside ``wire``.
Every request and reply is a frozen Struct, camelCase on the wire, with a
``type`` tag. A request may omit ``type`` (the subject says what it is); when
given it must match. Requests refuse unknown fields, so a typo is a
``bad_request`` naming the field instead of a silently ignored option.

The records replies carry (:class:`ModelRecord`, :class:`TopicRecord`,
:class:`CatalogModel`) are the registry's own, from :mod:`wire.records`.
See ``docs/api.md`` for every endpoint.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, UnsetType

from wire.errors import ErrorBody
from wire.messages import Channel, MessageText, PersonId, Timing, TopicId, Usage
from wire.records import LLM, CatalogEntry, TopicInfo
from wire.params import (
    BatchSize,
    Defaults,
    ContextSize,
    FlashAttention,
    GenerationParams,
    GpuLayers,
    ModelParams,
    SeqMax,
    Threads,
)

ModelIdRef = Annotated[str, Meta(min_length=1, max_length=128)]
Handle = Annotated[str, Meta(min_length=1, max_length=128)]
RequestId = Annotated[str, Meta(min_length=1, max_length=128)]
Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}$")]
ShortText = Annotated[str, Meta(min_length=1, max_length=200)]
FilePath = Annotated[str, Meta(min_length=1, max_length=4096)]
PullRef = Annotated[str, Meta(min_length=1, max_length=2048)]

SUBJECT_PATTERN = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"
"""A plain subject to publish on: dot-separated tokens, no wildcards, no ``$`` system subjects."""
_SUBJECT_RE = re.compile(SUBJECT_PATTERN)
Subject = Annotated[str, Meta(pattern=SUBJECT_PATTERN, max_length=256)]

FinishReasonOrCancelled = Literal["stop", "length", "stop_sequence", "cancelled"]


def valid_subject(subject: str) -> bool:
    return bool(_SUBJECT_RE.match(subject)) and len(subject) <= 256


R = TypeVar("R")


class ApiRequest(msgspec.Struct, Generic[R], frozen=True, rename="camel", tag_field="type", forbid_unknown_fields=True,
               kw_only=True, omit_defaults=True):
    """A request to ``<prefix>.api.<tag>``; ``R`` is its reply (the :data:`ENDPOINTS` table says so at run time)."""


class _Reply(msgspec.Struct, frozen=True, rename="camel", tag_field="type", kw_only=True):
    pass


# ------------------------------------------------------------------------------------------ records


#: The registry's own records, sent as they are (see wire/records.py).
ModelRecord = LLM
TopicRecord = TopicInfo
CatalogModel = CatalogEntry


# ------------------------------------------------------------------------------------------ models


class ModelsList(ApiRequest["ModelListReply"], tag="models.list"):
    include_deleted: bool = False


class ModelGet(ApiRequest["ModelReply"], tag="models.get"):
    model_id: ModelIdRef


class ModelImport(ApiRequest["ModelReply"], tag="models.import"):
    """Register a GGUF file that lies in one of the service's model directories."""

    path: FilePath
    name: ShortText | None = None
    generation: GenerationParams | None = None
    load: ModelParams | None = None
    expected_sha256: Sha256 | None = None
    progress_subject: Subject | None = None
    """Where to publish :class:`Progress` while the file is hashed (the caller subscribes first)."""


class ModelPull(ApiRequest["ModelReply"], tag="models.pull"):
    """Download a catalogue model (id or alias) or a ``.gguf`` URL into the models directory, then import it."""

    ref: PullRef
    name: ShortText | None = None
    progress_subject: Subject | None = None
    """Where to publish :class:`Progress` while downloading (the caller subscribes first)."""


class ModelUpdate(ApiRequest["ModelReply"], tag="models.update"):
    model_id: ModelIdRef
    generation: GenerationParams | None = None
    load: ModelParams | None = None
    reset: bool = False
    """Replace all stored parameters with these (instead of laying these over them)."""
    expected_version: Annotated[int, Meta(ge=0)] | None = None
    """The record's ``version`` the caller saw: ``conflict`` if it moved on."""
    system_prompt: MessageText | None | UnsetType = UNSET
    """What the model's conversations start with; null clears it (the service default applies); absent: unchanged."""


class ModelActivate(ApiRequest["ModelReply"], tag="models.activate"):
    model_id: ModelIdRef


class ModelRemove(ApiRequest["ModelReply"], tag="models.remove"):
    model_id: ModelIdRef


class ModelLoad(ApiRequest["ModelLoadReply"], tag="models.load"):
    model_id: ModelIdRef


class ModelUnload(ApiRequest["ModelUnloadReply"], tag="models.unload"):
    model_id: ModelIdRef


class ModelReply(_Reply, tag="model"):
    model: ModelRecord


class ModelListReply(_Reply, tag="model.list"):
    models: list[ModelRecord]
    active_model_id: str | None
    loaded: list[str]
    """Models this service holds loaded now, least recently used first."""


class ModelLoadReply(_Reply, tag="model.loaded"):
    model_id: str
    loaded: list[str]
    #: The node that loaded it (several nodes: each has its own engine; name one with <prefix>.api.node.<id>.*).
    node: str | None = None


class ModelUnloadReply(_Reply, tag="model.unloaded"):
    model_id: str
    was_loaded: bool
    loaded: list[str]
    #: The node that unloaded it.
    node: str | None = None


class Progress(_Reply, tag="progress"):
    """Published on a request's ``progressSubject`` while a pull or import runs. ``total`` null: unknown."""

    operation: Literal["pull", "import"]
    ref: str
    done: int
    total: int | None


# ------------------------------------------------------------------------------------------ catalogue


class CatalogList(ApiRequest["CatalogReply"], tag="catalog.list"):
    pass


class CatalogReply(_Reply, tag="catalog"):
    models: list[CatalogModel]
    registered: list[str]
    """Catalogue ids that are registered (and not removed) in this service's registry."""


# ------------------------------------------------------------------------------------------ topics


class TopicCreate(ApiRequest["TopicReply"], tag="topics.create"):
    topic_id: TopicId
    name: ShortText | None = None
    model_id: ModelIdRef | None = None
    created_by: ShortText | None = None
    system_prompt: MessageText | None = None
    """The topic's own system prompt, over its model's."""


class TopicGet(ApiRequest["TopicReply"], tag="topics.get"):
    topic_id: TopicId


class TopicList(ApiRequest["TopicListReply"], tag="topics.list"):
    pass


class TopicBind(ApiRequest["TopicReply"], tag="topics.bind"):
    topic_id: TopicId
    model_id: ModelIdRef | None
    """Required; null unbinds (the topic follows the active model again)."""


class TopicUpdate(ApiRequest["TopicReply"], tag="topics.update"):
    topic_id: TopicId
    system_prompt: MessageText | None
    """Required; null drops the topic's own prompt (its model's, else the default, applies)."""


class TopicAnalysisSet(ApiRequest["TopicReply"], tag="topics.analysis"):
    topic_id: TopicId
    enabled: bool
    """False: this topic is never analysed (title, keywords, summary, language); true: as the service's
    ``analysis`` setting says."""


class TopicReply(_Reply, tag="topic"):
    topic: TopicRecord


class TopicListReply(_Reply, tag="topic.list"):
    topics: list[TopicRecord]


# ------------------------------------------------------------------------------------------ llm (the seed's native module)


class LlmInitialize(ApiRequest["LlmHandle"], tag="llm.initialize"):
    """Load a model and get an opaque handle: ``modelId`` (a registered model, its stored parameters
    apply) or ``modelPath`` (a file in a model directory), plus optional load overrides."""

    model_id: ModelIdRef | None = None
    model_path: FilePath | None = None
    context_size: ContextSize | None = None
    batch_size: BatchSize | None = None
    gpu_layers: GpuLayers | None = None
    threads: Threads | None = None
    parallel: SeqMax | None = None
    flash_attention: FlashAttention | None = None

    def load_params(self) -> ModelParams:
        return ModelParams(context_size=self.context_size, batch_size=self.batch_size, gpu_layers=self.gpu_layers,
                           threads=self.threads, parallel=self.parallel, flash_attention=self.flash_attention)


class LlmHandle(_Reply, tag="llm.handle"):
    handle: str
    """``<nodeId>:<opaque>``: any node that gets a request on it hands it to that node."""
    model_id: str | None
    model_path: str
    context_size: int
    batch_size: int
    gpu_layers: int
    threads: int
    parallel: int
    #: The node whose engine holds the handle.
    node: str | None = None


class ChatTurnIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: MessageText


class LlmGenerate(ApiRequest["LlmResult"], tag="llm.generate"):
    """Exactly one of ``messages`` (chat, rendered with the model's template) or ``prompt`` (raw)."""

    handle: Handle
    messages: Annotated[list[ChatTurnIn], Meta(max_length=4096)] | None = None
    prompt: MessageText | None = None
    params: GenerationParams | None = None
    request_id: RequestId | None = None
    """Client-chosen id (for ``llm.cancel``); one is made up when absent. Unique among running requests."""
    author_id: PersonId | None = None
    """Who asks, for the per-author quotas (as a chat message's ``authorId``); requests without one share
    the quotas of the author ``anonymous``."""


class LlmGenerateStream(LlmGenerate, tag="llm.generate_stream", kw_only=True):
    subject: Subject
    """Where each :class:`LlmToken`, then the :class:`LlmResult` (or :class:`LlmFailed`), is published."""


class LlmToken(_Reply, tag="llm.token"):
    request_id: str
    seq: int
    """0, 1, 2, ... with no gaps per request."""
    text: str
    channel: Channel = "content"


class LlmResult(_Reply, tag="llm.result"):
    """The seed's response structure."""

    request_id: str
    handle: str
    model_id: str | None
    text: str
    thinking: str
    tokens: int
    finish_reason: FinishReasonOrCancelled
    timing: Timing
    usage: Usage


class LlmFailed(_Reply, tag="llm.failed"):
    """Published on a stream's subject when the generation fails (the reply carries the same error)."""

    request_id: str
    error: ErrorBody


class LlmRelease(ApiRequest["LlmReleased"], tag="llm.release"):
    handle: Handle


class LlmReleased(_Reply, tag="llm.released"):
    handle: str


class LlmCancel(ApiRequest["LlmCancelReply"], tag="llm.cancel"):
    request_id: RequestId


class LlmCancelReply(_Reply, tag="llm.cancel.reply"):
    request_id: str
    cancelled: bool


# ------------------------------------------------------------------------------------------ metrics


class MetricsReply(_Reply, tag="metrics"):
    """``<prefix>.api.metrics``: this node's Prometheus metrics, the same text ``/metrics`` serves."""

    content_type: str
    text: str
    #: The node whose metrics these are.
    node: str | None = None


class MetricsGet(ApiRequest[MetricsReply], tag="metrics"):
    pass


# ------------------------------------------------------------------------------------------ diagnostics


class RegistryDiagnostics(msgspec.Struct, frozen=True, rename="camel"):
    models: int
    live_models: int
    active_model_id: str | None
    loaded_models: list[str]
    topics: int
    events: int
    position: int
    db_path: str | None
    db_size_bytes: int | None
    model_dirs: list[str]


class IntakeDiagnostics(msgspec.Struct, frozen=True, rename="camel"):
    rejected: int
    taken: int
    in_flight: int
    window: int
    ack_wait: float
    #: Accepted by the broker, not yet taken: the queue a burst waits in (None: the broker could not say).
    waiting_in_stream: int | None = None


class ServiceDiagnostics(msgspec.Struct, frozen=True, rename="camel"):
    url: str | None
    embedded: bool
    prefix: str
    intake: IntakeDiagnostics
    defaults: Defaults
    """What a message gets when neither it nor its model says otherwise (wire.params)."""
    assistant: dict[str, Any] | None = None
    """Topic lanes, queues per model and counters (their shape is the assistant's)."""
    engine: dict[str, Any] | None = None
    """Loaded models, workers, slots, memory (their shape is the engine's; see docs/api.md)."""
    node: str | None = None
    """The node that answered (its node id); ``<prefix>.api.node.<node>.diagnostics`` asks that node."""
    partitions: list[int] | None = None
    """The topic partitions this node owns now (several nodes on a cluster; None: one node owns every topic)."""


class ApiDiagnostics(msgspec.Struct, frozen=True, rename="camel"):
    llm_handles: list[str]
    llm_running: list[str]
    errors: dict[str, int]
    """``<subject>.<code>`` -> errors answered since the process started."""


class Diagnostics(_Reply, tag="diagnostics"):
    service: ServiceDiagnostics
    registry: RegistryDiagnostics
    api: ApiDiagnostics


class DiagnosticsGet(ApiRequest[Diagnostics], tag="diagnostics"):
    pass


# ------------------------------------------------------------------------------------------ the table


class EndpointSpec(msgspec.Struct, frozen=True):
    """One endpoint: its request and reply types, said once. The service registers from this table,
    the client calls through it, and docs/asyncapi.yaml and docs/schemas/ are generated from it."""

    request: type[ApiRequest[Any]]
    reply: type
    description: str
    concurrent: bool = False
    """Each request runs in its own task (long handlers: pull, load, generate)."""

    @property
    def name(self) -> str:
        """``models.get``: the request's tag, and the subject after ``<prefix>.api.``."""
        return self.request.__struct_config__.tag  # type: ignore[return-value]

    def subject(self, api_prefix: str) -> str:
        return f"{api_prefix}.{self.name}"


ENDPOINTS: tuple[EndpointSpec, ...] = (
    EndpointSpec(ModelsList, ModelListReply, "registered models (the seed's LLM records)"),
    EndpointSpec(ModelGet, ModelReply, "one model record"),
    EndpointSpec(ModelImport, ModelReply, "register a GGUF file from a model directory", concurrent=True),
    EndpointSpec(ModelPull, ModelReply, "download a catalogue model or .gguf URL and import it", concurrent=True),
    EndpointSpec(ModelUpdate, ModelReply, "change a model's stored parameters"),
    EndpointSpec(ModelActivate, ModelReply, "make a model the active one"),
    EndpointSpec(ModelRemove, ModelReply, "unload and soft-delete a model", concurrent=True),
    EndpointSpec(ModelLoad, ModelLoadReply, "load a model now", concurrent=True),
    EndpointSpec(ModelUnload, ModelUnloadReply, "unload a model now", concurrent=True),
    EndpointSpec(CatalogList, CatalogReply, "models lamabus knows how to get"),
    EndpointSpec(TopicCreate, TopicReply, "create a topic room"),
    EndpointSpec(TopicGet, TopicReply, "one topic and who answers there"),
    EndpointSpec(TopicList, TopicListReply, "every topic"),
    EndpointSpec(TopicBind, TopicReply, "bind a topic to a model (null: follow the active one)"),
    EndpointSpec(TopicUpdate, TopicReply, "set or clear the topic's system prompt"),
    EndpointSpec(TopicAnalysisSet, TopicReply, "switch the topic's analysis off or on"),
    EndpointSpec(LlmInitialize, LlmHandle, "load a model, get an opaque handle", concurrent=True),
    EndpointSpec(LlmGenerate, LlmResult, "generate; reply with the result", concurrent=True),
    EndpointSpec(LlmGenerateStream, LlmResult, "generate, publishing each chunk on the caller's subject",
                 concurrent=True),
    EndpointSpec(LlmCancel, LlmCancelReply, "stop a running llm.generate/generate_stream"),
    EndpointSpec(LlmRelease, LlmReleased, "release a handle", concurrent=True),
    EndpointSpec(DiagnosticsGet, Diagnostics, "what the service holds and how it is doing"),
    EndpointSpec(MetricsGet, MetricsReply, "Prometheus metrics in the text exposition format"),
)

_BY_REQUEST: dict[type, EndpointSpec] = {spec.request: spec for spec in ENDPOINTS}


def endpoint_for(request: ApiRequest[Any] | type[ApiRequest[Any]]) -> EndpointSpec:
    """The table's row for a request (or request type)."""
    kind = request if isinstance(request, type) else type(request)
    try:
        return _BY_REQUEST[kind]
    except KeyError:
        raise TypeError(f"{kind.__name__} is not a request of the lamabus API") from None
