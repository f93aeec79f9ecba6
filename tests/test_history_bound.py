"""A topic's conversation in memory is bounded; prompts and exactly-once hold after eviction (issue 16)."""

from __future__ import annotations

from pathlib import Path

from engine.types import ChatTurn
from handlers.assistant import Assistant
from handlers.directory import RegistryDirectory
from handlers.registry import Registry
from domain.projections import Projections
from tests.test_assistant_unit import FakeDelivery, FakePublisher, FakeRuntime
from tests.test_registry import Clock, chat, reply_for, write_gguf


async def test_history_is_bounded_and_the_prompt_uses_the_kept_tail(tmp_path: Path):
    models = tmp_path / "models"
    async with Registry.open(tmp_path / "r.sqlite3", [models], clock=Clock(), history_turns=4) as registry:
        model = await registry.import_model(write_gguf(models / "a.gguf"), "A")
        await registry.activate(model.id)
        for i in range(5):
            message = chat("room", f"m{i}", text=f"question {i}")
            reply, completed = reply_for(message, model, text=f"answer {i}")
            await registry.record_reply(message, reply, completed)

        view = registry.view
        assert [t.text for t in view.conversation("room")] == ["question 3", "answer 3", "question 4", "answer 4"]
        assert len(view.replies["room"]) == 4  # the reply texts kept are bounded too
        # Exactly-once does not depend on the cache: the evicted m0 is still known as answered.
        directory = RegistryDirectory(registry)
        assert view.has_replied("room", "m0")
        assert await directory.recorded_reply("room", "m0") is not None
        assert await directory.recorded_reply("room", "m9") is None
        # Rebuilding from the log with the same bound gives the same state.
        rebuilt = await Projections.rebuild(registry.store, history_turns=4)
        assert rebuilt.state() == view.state()
        # The room's counters are not bounded: they count the whole log.
        assert (view.topics["room"].message_count, view.topics["room"].reply_count) == (5, 5)

        # A new message's prompt: system, the kept tail, the new question, in order.
        runtime, publisher = FakeRuntime(), FakePublisher()
        async with Assistant(directory, runtime, publisher) as assistant:
            delivery = FakeDelivery()
            await assistant.submit(chat("room", "m5", text="question 5"), delivery)
            await delivery.acked.wait()
        (request,) = runtime.requests
        assert request.messages[1:] == (ChatTurn("user", "question 3"), ChatTurn("assistant", "answer 3"),
                                        ChatTurn("user", "question 4"), ChatTurn("assistant", "answer 4"),
                                        ChatTurn("user", "question 5"))
        assert request.messages[0].role == "system"
