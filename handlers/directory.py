"""The assistant's view of the registry: the :class:`handlers.ports.Directory` port over a
:class:`~handlers.registry.Registry` (which model answers a topic, its history, what is
already answered, recording a reply)."""

from __future__ import annotations

from datetime import datetime

from engine.types import ChatTurn, ModelConfig
from handlers.ports import ModelRef, RecordedReply
from handlers.registry import Registry, has_values
from domain.events import TopicReplyPosted
from wire.messages import ChatMessage, GenerationCompleted


class RegistryDirectory:
    """The assistant's :class:`handlers.ports.Directory` over a :class:`Registry`.

    It reads the registry's view as it stands, without a trip to SQLite per look-up:
    everything this process writes is in the view when the write returns, and the
    service applies other processes' writes as the store's follower sees them
    (``bus.node.app``). Decisions that must not act on a stale view (recording a reply)
    catch up inside the registry's own write path.
    """

    def __init__(self, registry: Registry, *, history_turns: int = 256) -> None:
        self.registry = registry
        # The engine trims what does not fit in n_ctx; this only bounds what we hand it.
        self.history_turns = history_turns

    async def resolve_model(self, topic: str, requested: str | None) -> ModelRef:
        m = await self.registry.model_for_topic(topic, requested, refresh=False)
        gen = m.generation_params()
        room = self.registry.view.topics.get(topic)
        return ModelRef(model_id=m.id, person_id=m.person_id,
                        config=ModelConfig.resolve(m.model_path, m.model_params()),
                        params=gen if has_values(gen) else None,
                        system_prompt=(room.system_prompt if room else None) or m.system_prompt)

    def is_ai(self, author_id: str) -> bool:
        return self.registry.is_ai(author_id)

    async def recorded_reply(self, topic: str, message_id: str) -> RecordedReply | None:
        view = self.registry.view
        ev = view.reply_to(topic, message_id)
        if ev is None:
            if view.settled_unanswered(topic, message_id):
                return RecordedReply(reply=None, completed=None)  # settled without a reply (cancelled, ...)
            if view.has_replied(topic, message_id):
                # Answered so long ago that the reply's text left the cache: settle it without
                # publishing again (the broker's copy was acknowledged long since).
                return RecordedReply(reply=None, completed=None)
            return None
        return RecordedReply(reply=reply_message(topic, ev), completed=completed_event(topic, ev))

    async def history(self, topic: str) -> list[ChatTurn]:
        turns = await self.registry.history(topic, refresh=False)
        # A user message that got no reply (cancelled) would leave two user turns in a row.
        kept = [t for t in turns if not t.unanswered]
        return [ChatTurn("assistant" if t.is_ai else "user", t.text) for t in kept[-self.history_turns:]]

    async def record_reply(self, message: ChatMessage, reply: ChatMessage, completed: GenerationCompleted) -> None:
        await self.registry.record_reply(message, reply, completed)

    async def record_unanswered(self, message: ChatMessage, reason: str) -> None:
        await self.registry.record_message(message, unanswered=reason)


def reply_message(topic: str, ev: TopicReplyPosted) -> ChatMessage:
    """The reply as it was published, rebuilt from the log (the same id, so the broker de-duplicates it)."""
    return ChatMessage(id=ev.message_id, topic=topic, author_id=ev.author_id, text=ev.text,
                       sent_at=datetime.fromisoformat(ev.sent_at.replace("Z", "+00:00")), reply_to=ev.reply_to,
                       model_id=ev.model_id)


def completed_event(topic: str, ev: TopicReplyPosted) -> GenerationCompleted | None:
    if ev.usage is None or ev.timing is None or ev.finish_reason not in ("stop", "length", "stop_sequence"):
        return None
    return GenerationCompleted(
        request_id=ev.reply_to, message_id=ev.message_id, topic=topic, author_id=ev.author_id,
        model_id=ev.model_id, text=ev.text, thinking=ev.thinking, tokens=ev.tokens,
        finish_reason=ev.finish_reason,  # type: ignore[arg-type]
        timing=ev.timing, usage=ev.usage,
    )
