"""The intake binds itself again when its stream and consumer vanish (a broker back with an empty store)."""

from __future__ import annotations

import anyio
import pytest
from nats.js.errors import NotFoundError

from wire.messages import GenerationCompleted
from wire.params import GenerationParams

pytestmark = pytest.mark.model


async def wait_for_stream(client, name: str, timeout: float = 60) -> None:
    with anyio.fail_after(timeout):
        while True:
            try:
                await client.js.stream_info(name)
                return
            except NotFoundError:
                await anyio.sleep(0.2)  # the broker announces no "stream created" event to wait on


async def test_answers_again_after_the_stream_is_deleted(service, client):
    params = GenerationParams(max_tokens=8, temperature=0.0)
    first = [i async for i in client.ask("again", "Hi", params=params)]
    assert isinstance(first[-1], GenerationCompleted)

    await client.js.delete_stream(service.subjects.stream_name)
    await wait_for_stream(client, service.subjects.stream_name)  # the intake recreates it
    second = [i async for i in client.ask("again", "Hello there", params=params)]
    assert isinstance(second[-1], GenerationCompleted)
    assert service.intake.rebinds >= 1
