"""A write to the registry file by another process reaches the running service's view."""

from __future__ import annotations

import anyio

from handlers.registry import Registry


async def test_foreign_write_reaches_the_service_view(service):
    async with Registry.open(service.settings.registry_path) as other:  # as another process would
        await other.set_topic_system_prompt("from-elsewhere", "Speak like a pirate.")
    with anyio.fail_after(15):
        while "from-elsewhere" not in service.registry.view.topics:
            await anyio.sleep(0.05)  # the store's follower polls for foreign commits
    directory = service.assistant.directory
    assert (await directory.resolve_model("from-elsewhere", None)).system_prompt == "Speak like a pirate."
