"""The wire schema: every message lamabus sends or accepts, as frozen msgspec Structs.

This package is the one leaf every layer may import. It does no I/O.
Field names are snake_case in Python and camelCase on the wire; every payload
carries a ``type`` tag. See ``docs/wire.md`` for the contract in prose.
"""

from wire.errors import ErrorBody, ErrorCode, LamaError
from wire.params import DEFAULTS, Defaults, GenerationParams, SamplingParams
from wire.messages import (
    TOPIC_ID_PATTERN,
    CancelReply,
    ChatMessage,
    GenerationCancel,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    GenerationToken,
    MessageRejected,
    Timing,
    TopicEvent,
    Usage,
    decode_topic_event,
    encode,
    valid_topic_id,
)

__all__ = [
    "CancelReply",
    "ChatMessage",
    "DEFAULTS",
    "Defaults",
    "ErrorBody",
    "ErrorCode",
    "GenerationCancel",
    "GenerationCancelled",
    "GenerationCompleted",
    "GenerationFailed",
    "GenerationParams",
    "GenerationStarted",
    "GenerationToken",
    "LamaError",
    "MessageRejected",
    "SamplingParams",
    "TOPIC_ID_PATTERN",
    "Timing",
    "TopicEvent",
    "Usage",
    "decode_topic_event",
    "encode",
    "valid_topic_id",
]
