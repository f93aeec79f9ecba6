"""``busy`` is kept for a bound an operator set, and a busy message can be sent again (issue 16)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import anyio
import pytest

from bus.node.app import LamabusService
from bus.client import LamabusClient
from bus.config import Settings
from tests.conftest import entered_in_own_task
from wire.api import DiagnosticsGet
from wire.errors import ErrorCode, LamaError
from wire.messages import ChatMessage, GenerationCompleted, GenerationFailed, GenerationToken, decode_topic_event
from wire.params import GenerationParams

pytestmark = pytest.mark.model

LONG = GenerationParams(max_tokens=400, temperature=0.0)
SHORT = GenerationParams(max_tokens=2, temperature=0.0)


async def test_a_busy_message_is_answered_when_sent_again_under_a_new_dedup_id(tmp_path, nats_url):
    # The window above the per-model bound: the second message is taken while the first runs.
    settings = Settings(nats_url=nats_url, data_dir=str(tmp_path / "data"), max_queue_per_model=1, intake_window=8)
    async with entered_in_own_task(LamabusService(settings)) as svc, \
            LamabusClient.connect(svc.url, prefix=settings.prefix) as client:
        first_token = anyio.Event()
        failures: list[GenerationFailed] = []

        async def on_msg(msg) -> None:
            event = decode_topic_event(msg.data)
            if isinstance(event, GenerationToken):
                first_token.set()
            elif isinstance(event, GenerationFailed):
                failures.append(event)

        await client.nc.subscribe("lama.topic.busy-a.>", cb=on_msg)
        await client.nc.flush()
        long = ChatMessage(id=str(uuid.uuid4()), topic="busy-a", author_id="u", text="Count to 300.",
                           sent_at=datetime.now(timezone.utc), params=LONG)
        await client.post(long)
        with anyio.fail_after(60):
            await first_token.wait()
        second_id = str(uuid.uuid4())
        with pytest.raises(LamaError) as exc:
            async for _ in client.ask("busy-a", "Hi", params=SHORT, message_id=second_id):
                pass
        assert exc.value.code is ErrorCode.BUSY and exc.value.details["retryable"] is True
        await client.cancel("busy-a", long.id)
        # Retry once the model's queue has room again (the cancelled request has left its lane).
        with anyio.fail_after(60):
            while (await client.call(DiagnosticsGet())).service.assistant["queued_per_model"]:
                await anyio.sleep(0.05)
        # The same message id again: the broker would drop a copy with the same Nats-Msg-Id...
        ack = await client.js.publish("lama.topic.busy-a.msg", b"{}", headers={"Nats-Msg-Id": second_id})
        assert ack.duplicate
        # ...so a retry goes under a new one, and the message (same id) is answered.
        items = [i async for i in client.ask("busy-a", "Hi", params=SHORT, message_id=second_id, attempt=1)]
        assert isinstance(items[-1], GenerationCompleted) and items[-1].request_id == second_id
