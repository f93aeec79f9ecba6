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
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from wire.errors import ErrorBody
from wire.messages import Channel, MessageText, Timing, TopicId, Usage
from wire.records import LLM, CatalogEntry, TopicInfo
from wire.params import (
    BatchSize,
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


class _Request(msgspec.Struct, frozen=True, rename="camel", tag_field="type", forbid_unknown_fields=True,
               kw_only=True, omit_defaults=True):
    pass


class _Reply(msgspec.Struct, frozen=True, rename="camel", tag_field="type", kw_only=True):
    pass


# ------------------------------------------------------------------------------------------ records


#: The registry's own records, sent as they are (see wire/records.py).
ModelRecord = LLM
TopicRecord = TopicInfo
CatalogModel = CatalogEntry


# ------------------------------------------------------------------------------------------ models


class ModelsList(_Request, tag="models.list"):
    include_deleted: bool = False


class ModelGet(_Request, tag="models.get"):
    model_id: ModelIdRef


class ModelImport(_Request, tag="models.import"):
    """Register a GGUF file that lies in one of the service's model directories."""

    path: FilePath
    name: ShortText | None = None
    generation: GenerationParams | None = None
    load: ModelParams | None = None
    expected_sha256: Sha256 | None = None
    progress_subject: Subject | None = None
    """Where to publish :class:`Progress` while the file is hashed (the caller subscribes first)."""


class ModelPull(_Request, tag="models.pull"):
    """Download a catalogue model (id or alias) or a ``.gguf`` URL into the models directory, then import it."""

    ref: PullRef
    name: ShortText | None = None
    progress_subject: Subject | None = None
    """Where to publish :class:`Progress` while downloading (the caller subscribes first)."""


class ModelUpdate(_Request, tag="models.update"):
    model_id: ModelIdRef
    generation: GenerationParams | None = None
    load: ModelParams | None = None
    reset: bool = False
    """Replace all stored parameters with these (instead of laying these over them)."""
    expected_version: Annotated[int, Meta(ge=0)] | None = None
    """The record's ``version`` the caller saw: ``conflict`` if it moved on."""
    system_prompt: MessageText | None | UnsetType = UNSET
    """What the model's conversations start with; null clears it (the service default applies); absent: unchanged."""


class ModelActivate(_Request, tag="models.activate"):
    model_id: ModelIdRef


class ModelRemove(_Request, tag="models.remove"):
    model_id: ModelIdRef


class ModelLoad(_Request, tag="models.load"):
    model_id: ModelIdRef


class ModelUnload(_Request, tag="models.unload"):
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


class ModelUnloadReply(_Reply, tag="model.unloaded"):
    model_id: str
    was_loaded: bool
    loaded: list[str]


class Progress(_Reply, tag="progress"):
    """Published on a request's ``progressSubject`` while a pull or import runs. ``total`` null: unknown."""

    operation: Literal["pull", "import"]
    ref: str
    done: int
    total: int | None


# ------------------------------------------------------------------------------------------ catalogue


class CatalogList(_Request, tag="catalog.list"):
    pass


class CatalogReply(_Reply, tag="catalog"):
    models: list[CatalogModel]
    registered: list[str]
    """Catalogue ids that are registered (and not removed) in this service's registry."""


# ------------------------------------------------------------------------------------------ topics


class TopicCreate(_Request, tag="topics.create"):
    topic_id: TopicId
    name: ShortText | None = None
    model_id: ModelIdRef | None = None
    created_by: ShortText | None = None
    system_prompt: MessageText | None = None
    """The topic's own system prompt, over its model's."""


class TopicGet(_Request, tag="topics.get"):
    topic_id: TopicId


class TopicList(_Request, tag="topics.list"):
    pass


class TopicBind(_Request, tag="topics.bind"):
    topic_id: TopicId
    model_id: ModelIdRef | None
    """Required; null unbinds (the topic follows the active model again)."""


class TopicUpdate(_Request, tag="topics.update"):
    topic_id: TopicId
    system_prompt: MessageText | None
    """Required; null drops the topic's own prompt (its model's, else the default, applies)."""


class TopicReply(_Reply, tag="topic"):
    topic: TopicRecord


class TopicListReply(_Reply, tag="topic.list"):
    topics: list[TopicRecord]


# ------------------------------------------------------------------------------------------ llm (the seed's native module)


class LlmInitialize(_Request, tag="llm.initialize"):
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
    model_id: str | None
    model_path: str
    context_size: int
    batch_size: int
    gpu_layers: int
    threads: int
    parallel: int


class ChatTurnIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: MessageText


class LlmGenerate(_Request, tag="llm.generate"):
    """Exactly one of ``messages`` (chat, rendered with the model's template) or ``prompt`` (raw)."""

    handle: Handle
    messages: Annotated[list[ChatTurnIn], Meta(max_length=4096)] | None = None
    prompt: MessageText | None = None
    params: GenerationParams | None = None
    request_id: RequestId | None = None
    """Client-chosen id (for ``llm.cancel``); one is made up when absent. Unique among running requests."""


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


class LlmRelease(_Request, tag="llm.release"):
    handle: Handle


class LlmReleased(_Reply, tag="llm.released"):
    handle: str


class LlmCancel(_Request, tag="llm.cancel"):
    request_id: RequestId


class LlmCancelReply(_Reply, tag="llm.cancel.reply"):
    request_id: str
    cancelled: bool


# ------------------------------------------------------------------------------------------ metrics


class MetricsReply(_Reply, tag="metrics"):
    """``<prefix>.api.metrics``: this node's Prometheus metrics, the same text ``/metrics`` serves."""

    content_type: str
    text: str
