"""Topic traffic: what flows on ``<prefix>.topic.<topic>.{msg,tok,evt,cancel}``."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta

from wire.decoding import decode_untrusted
from wire.errors import ErrorBody
from wire.params import GenerationParams

TOPIC_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
_TOPIC_ID_RE = re.compile(TOPIC_ID_PATTERN)

TopicId = Annotated[str, Meta(pattern=TOPIC_ID_PATTERN)]
MessageId = Annotated[str, Meta(min_length=1, max_length=128)]
PersonId = Annotated[str, Meta(min_length=1, max_length=256)]
ModelId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
# A chat message is text a person typed; 64 KiB is far past any context we load.
MessageText = Annotated[str, Meta(max_length=65536)]

FinishReason = Literal["stop", "length", "stop_sequence"]
Channel = Literal["content", "thinking"]


def valid_topic_id(topic: str) -> bool:
    return bool(_TOPIC_ID_RE.match(topic))


class _Wire(msgspec.Struct, frozen=True, rename="camel", tag_field="type"):
    pass


class ChatMessage(_Wire, tag="chat.message", forbid_unknown_fields=False):
    """A message in a topic: from a person, a program, or (with replyTo) the AI."""

    id: MessageId
    topic: TopicId
    author_id: PersonId
    text: MessageText
    sent_at: datetime
    reply_to: MessageId | None = None
    model_id: ModelId | None = None
    params: GenerationParams | None = None


class GenerationToken(_Wire, tag="generation.token"):
    request_id: str
    topic: str
    author_id: str
    seq: int
    text: str
    channel: Channel = "content"


class Timing(msgspec.Struct, frozen=True, rename="camel"):
    """Epoch milliseconds for start/end; durations in milliseconds."""

    start_time: float
    end_time: float
    elapsed_time: float
    tokens_per_second: float
    time_to_first_token: float
    queue_time: float = 0.0


class Usage(msgspec.Struct, frozen=True, rename="camel"):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


class GenerationStarted(_Wire, tag="generation.started"):
    request_id: str
    topic: str
    author_id: str
    model_id: str
    queue_position: int = 0
    #: The lamabus node that answers (several nodes on one cluster); None from a single node that set none.
    node_id: str | None = None


class GenerationCompleted(_Wire, tag="generation.completed"):
    """The seed's response structure, plus who answered what."""

    request_id: str
    message_id: str
    topic: str
    author_id: str
    model_id: str
    text: str
    thinking: str
    tokens: int
    finish_reason: FinishReason
    timing: Timing
    usage: Usage
    #: The lamabus node that answers (several nodes on one cluster); None from a single node that set none.
    node_id: str | None = None


class GenerationFailed(_Wire, tag="generation.failed"):
    request_id: str
    topic: str
    error: ErrorBody
    #: The lamabus node that answers (several nodes on one cluster); None from a single node that set none.
    node_id: str | None = None


class GenerationCancelled(_Wire, tag="generation.cancelled"):
    request_id: str
    topic: str
    author_id: str
    text: str
    tokens: int
    #: The lamabus node that answers (several nodes on one cluster); None from a single node that set none.
    node_id: str | None = None


class MessageRejected(_Wire, tag="message.rejected"):
    """A payload on a topic that lamabus could not accept, and why."""

    topic: str
    error: ErrorBody
    message_id: str | None = None


class TopicAnalysed(_Wire, tag="topic.analysed"):
    """What the topic is about, as its model saw it after reply ``basedOnMessageId`` (issue 13 part 2).

    Made in the background, at low priority, after a topic's first reply and every
    ``analysis_every`` replies after; also kept in the registry (``topics.get``'s ``analysis``)."""

    topic: str
    based_on_message_id: str
    """The last reply the analysis read (the conversation up to it)."""
    model_id: str
    title: str
    """At most 60 characters."""
    keywords: list[str]
    """3 to 7."""
    summary: str
    """At most two sentences."""
    language: str
    """A BCP 47 tag (``en``, ``de-CH``, ...)."""
    reply_count: int
    """Replies in the topic when it was made."""
    analysed_at: int
    """Epoch milliseconds."""
    node_id: str | None = None


class GenerationCancel(_Wire, tag="generation.cancel"):
    """Request on ``.cancel``: stop ``requestId``, or whatever runs in the topic."""

    topic: TopicId
    request_id: str | None = None


class CancelReply(_Wire, tag="generation.cancel.reply"):
    topic: str
    cancelled: bool
    request_id: str | None = None


TopicEvent = Union[
    ChatMessage,
    GenerationToken,
    GenerationStarted,
    GenerationCompleted,
    GenerationFailed,
    GenerationCancelled,
    MessageRejected,
    TopicAnalysed,
]

_topic_decoder = msgspec.json.Decoder(TopicEvent)
_encoder = msgspec.json.Encoder()


def decode_topic_event(data: bytes) -> TopicEvent:
    """Any topic payload; whatever the bytes, a failure is a ``bad_request`` LamaError."""
    return decode_untrusted(_topic_decoder, data)


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)
