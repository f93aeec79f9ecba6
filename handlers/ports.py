"""The small ports the assistant talks through; bus/ and tests plug real or fake ones in.

handlers/ never imports NATS: it hands typed wire messages to a :class:`Publisher`
and asks a :class:`Directory` (the registry) and a :class:`Runtime` (the engine)
for everything else.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol, Sequence

import msgspec

from engine.types import ChatTurn, GenerateRequest, GenerationResult, ModelConfig, TokenChunk
from wire.messages import ChatMessage, GenerationCompleted, GenerationToken, TopicEvent
from wire.params import GenerationParams, SamplingParams


class HandBack(Exception):
    """Not a failure: this message's turn has not come (an earlier one of its topic is still to be
    answered); a port raises it to have the message handed back to the broker and answered later."""


class ModelRef(msgspec.Struct, frozen=True):
    """A model as the assistant needs it: who it is, how to load it, how it samples."""

    model_id: str
    person_id: str
    config: ModelConfig
    params: GenerationParams | None = None
    system_prompt: str | None = None


class RecordedReply(msgspec.Struct, frozen=True):
    """What the registry remembers of a message it has already answered."""

    reply: ChatMessage | None
    completed: GenerationCompleted | None


class Publisher(Protocol):
    async def token(self, token: GenerationToken) -> None:
        """Ephemeral, fire-and-forget (core NATS)."""

    async def event(self, event: TopicEvent, *, dedup_id: str, wait: bool = True) -> None:
        """Durable topic event (JetStream), de-duplicated by ``dedup_id``.

        ``wait=False``: sent in order, but without waiting for the broker's acknowledgement
        (for events on the latency path whose loss costs nothing but a notice)."""

    async def message(self, message: ChatMessage) -> None:
        """Durable chat message (JetStream), de-duplicated by its id."""


class Directory(Protocol):
    async def resolve_model(self, topic: str, requested: str | None) -> ModelRef:
        """The model that answers in ``topic``: the requested one, the topic's, or the active one."""

    def is_ai(self, author_id: str) -> bool: ...

    async def recorded_reply(self, topic: str, message_id: str) -> RecordedReply | None: ...

    async def history(self, topic: str) -> Sequence[ChatTurn]:
        """Earlier turns of the topic, oldest first (user and assistant)."""

    async def record_reply(self, message: ChatMessage, reply: ChatMessage, completed: GenerationCompleted) -> None:
        """Record the message as seen and its reply, atomically."""

    async def record_unanswered(self, message: ChatMessage, reason: str) -> None:
        """Record the message as seen and handled without a reply (failed, cancelled)."""


class Runtime(Protocol):
    def generate_stream(self, model: ModelRef, request: GenerateRequest) -> AsyncIterator[TokenChunk | GenerationResult]:
        """Chunks then one result; loads ``model`` if needed and keeps it loaded meanwhile."""

    async def check(self, model: ModelRef, sampling: SamplingParams) -> None:
        """Raise the ``bad_request`` a generation with ``sampling`` would fail with for its grammar or
        JSON schema; return when there is none or it compiles (loading ``model`` if needed)."""

    async def cancel(self, request_id: str) -> bool: ...
