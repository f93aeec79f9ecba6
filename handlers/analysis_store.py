"""The topic analyser's view of the registry: the :class:`handlers.topic_analysis.AnalysisStore` port
over a :class:`~handlers.registry.Registry`."""

from __future__ import annotations

from collections.abc import Sequence

from engine.types import ChatTurn
from handlers.directory import RegistryDirectory
from handlers.ports import ModelRef
from handlers.registry import Registry
from handlers.topic_analysis import TopicState
from wire.records import TopicAnalysis


class RegistryAnalysisStore:
    """Reads the registry's view as it stands (as the assistant's directory does); records through
    the registry's command, which decides on a caught-up view."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.directory = RegistryDirectory(registry)  # the model and the history exactly as the assistant sees them

    def topic_state(self, topic: str) -> TopicState | None:
        view = self.registry.view
        room = view.topics.get(topic)
        if room is None:
            return None
        last_reply = next((t.message_id for t in reversed(view.conversation(topic)) if t.is_ai), None)
        return TopicState(reply_count=room.reply_count, last_reply_id=last_reply,
                          analysed_reply_count=room.analysis.reply_count if room.analysis else None,
                          enabled=room.analysis_enabled)

    async def resolve_model(self, topic: str) -> ModelRef:
        return await self.directory.resolve_model(topic, None)

    async def history(self, topic: str) -> Sequence[ChatTurn]:
        return await self.directory.history(topic)

    async def record_analysis(self, topic: str, analysis: TopicAnalysis) -> TopicAnalysis | None:
        return await self.registry.record_analysis(topic, analysis)
