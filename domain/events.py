"""The registry's domain events: what happened to a model or a topic, as frozen tagged Structs.

Two kinds of stream:

* ``model-<model id>``: imported, parameters changed, activated, deactivated,
  loaded, unloaded, load failed, used, removed.
* ``topic-<topic id>``: created, model bound, message seen, reply posted.

An event never repeats the id of the entity it belongs to: the stream id says
that, so the two can never disagree. Every event carries ``at`` (epoch
milliseconds, taken by the command that decided it) so that projections are a
pure function of the log and a rebuild gives exactly the same state.

The encoded form is JSON with a ``type`` tag. Tags are part of the on-disk
format: renaming one needs a migration, adding a field needs a default.
"""

from __future__ import annotations

from typing import Literal, Union

import msgspec

from wire.decoding import decode_untrusted
from wire.messages import Timing, Usage
from wire.params import GenerationParams, ModelParams

MODEL_STREAM_PREFIX = "model-"
TOPIC_STREAM_PREFIX = "topic-"


def model_stream(model_id: str) -> str:
    return MODEL_STREAM_PREFIX + model_id


def topic_stream(topic_id: str) -> str:
    return TOPIC_STREAM_PREFIX + topic_id


class DomainEvent(msgspec.Struct, frozen=True, tag_field="type", kw_only=True, omit_defaults=True):
    at: int
    """Epoch milliseconds when the command that produced this event ran."""


# ---------------------------------------------------------------------------- model-<id>


class ModelImported(DomainEvent, tag="model.imported"):
    """A GGUF file was registered (or re-registered after removal) under this model id."""

    name: str
    filename: str
    model_path: str
    size: int
    checksum: str
    architecture: str
    parameter_count: int
    context_length: int | None = None
    quantization: str | None = None
    capabilities: tuple[str, ...] = ("chat", "inference")
    model_type: Literal["local", "cloud"] = "local"
    provider: str | None = None
    creator: str = "lamabus"
    generation: GenerationParams | None = None
    load: ModelParams | None = None


class ModelParametersChanged(DomainEvent, tag="model.parameters_changed"):
    """Overrides laid over the stored ones (fields set here win); ``reset`` drops the old ones first."""

    generation: GenerationParams | None = None
    load: ModelParams | None = None
    reset: bool = False


class ModelSystemPromptSet(DomainEvent, tag="model.system_prompt_set"):
    """The system prompt this model's conversations start with (None: the service default)."""

    system_prompt: str | None = None


class ModelActivated(DomainEvent, tag="model.activated"):
    pass


class ModelDeactivated(DomainEvent, tag="model.deactivated"):
    reason: str = "replaced"


class ModelLoaded(DomainEvent, tag="model.loaded"):
    handle: str
    n_ctx: int
    load_ms: float = 0.0


class ModelUnloaded(DomainEvent, tag="model.unloaded"):
    reason: Literal["requested", "idle", "evicted", "removed", "reconfigured", "shutdown", "restart"] = "requested"


class ModelLoadFailed(DomainEvent, tag="model.load_failed"):
    code: str
    message: str


class ModelUsed(DomainEvent, tag="model.used"):
    pass


class ModelRemoved(DomainEvent, tag="model.removed"):
    """Soft delete: the record stays (deleted=True) so history and identity survive."""


# ---------------------------------------------------------------------------- topic-<id>


class TopicCreated(DomainEvent, tag="topic.created"):
    name: str | None = None
    created_by: str | None = None


class TopicModelBound(DomainEvent, tag="topic.model_bound"):
    """``model_id`` None unbinds: the topic follows the active model again."""

    model_id: str | None = None


class TopicSystemPromptSet(DomainEvent, tag="topic.system_prompt_set"):
    """The topic's own system prompt, over the model's (None: the model's or the default)."""

    system_prompt: str | None = None


class TopicMessageSeen(DomainEvent, tag="topic.message_seen"):
    message_id: str
    author_id: str
    text: str
    sent_at: str
    """ISO-8601 as the sender stated it."""
    unanswered: str | None = None
    """Set when the message was handled without a reply (``cancelled``, ...): it is settled all the same."""


class TopicReplyPosted(DomainEvent, tag="topic.reply_posted"):
    """The AI's reply to ``reply_to``: enough to publish it again, byte for byte, after a crash."""

    message_id: str
    reply_to: str
    model_id: str
    author_id: str
    text: str
    sent_at: str
    thinking: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    usage: Usage | None = None
    timing: Timing | None = None


class TopicAnalysed(DomainEvent, tag="topic.analysed"):
    """What the topic is about, as its model saw it after reply ``based_on_message_id`` (made in the
    background, issue 13 part 2); a later one replaces it."""

    based_on_message_id: str
    model_id: str
    title: str
    keywords: tuple[str, ...]
    summary: str
    language: str
    reply_count: int
    """Replies in the topic when it was made: the next is due ``analysis_every`` replies later."""


class TopicAnalysisSwitched(DomainEvent, tag="topic.analysis_switched"):
    """The topic's own analysis switch (``enabled`` False: never analysed, whatever the service's setting)."""

    enabled: bool = True


AnyEvent = Union[
    ModelImported,
    ModelParametersChanged,
    ModelSystemPromptSet,
    ModelActivated,
    ModelDeactivated,
    ModelLoaded,
    ModelUnloaded,
    ModelLoadFailed,
    ModelUsed,
    ModelRemoved,
    TopicCreated,
    TopicModelBound,
    TopicSystemPromptSet,
    TopicMessageSeen,
    TopicReplyPosted,
    TopicAnalysed,
    TopicAnalysisSwitched,
]

EVENT_TYPES: tuple[type[DomainEvent], ...] = AnyEvent.__args__  # type: ignore[attr-defined]

# Built once: msgspec compiles the tagged union into one decoder.
_decoder = msgspec.json.Decoder(AnyEvent)
_encoder = msgspec.json.Encoder()


def event_type(event: DomainEvent) -> str:
    return event.__struct_config__.tag  # type: ignore[return-value]


def encode_event(event: DomainEvent) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> DomainEvent:
    """Whatever the bytes, a failure is a ``bad_request`` LamaError (see wire.decoding)."""
    return decode_untrusted(_decoder, data)
