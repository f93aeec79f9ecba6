"""lama.api.llm.*: the seed's native-module API over the bus, with the bundled model."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from tests.test_api import BUNDLED, error, raw
from wire.api import (
    DiagnosticsGet,
    ChatTurnIn,
    LlmCancel,
    LlmCancelReply,
    LlmFailed,
    LlmGenerate,
    LlmGenerateStream,
    LlmHandle,
    LlmInitialize,
    LlmRelease,
    LlmReleased,
    LlmResult,
    LlmToken,
    ModelsList,
)
from wire.errors import ErrorCode
from wire.params import GenerationParams

pytestmark = pytest.mark.model

GREEDY = GenerationParams(max_tokens=8, temperature=0.0, seed=1)
StreamItem = LlmToken | LlmResult | LlmFailed
_stream_decoder = msgspec.json.Decoder(StreamItem)


async def initialize(client, **kw) -> LlmHandle:
    return await client.call(LlmInitialize(**kw), timeout=120)


class Stream:
    """Everything published on one generate_stream subject, in arrival order."""

    def __init__(self, client) -> None:
        self.client = client
        self.subject = client.nc.new_inbox()
        self.items: list[StreamItem] = []
        self.first = anyio.Event()
        self.done = anyio.Event()

    async def __aenter__(self) -> "Stream":
        async def on_msg(msg) -> None:
            item = _stream_decoder.decode(msg.data)
            self.items.append(item)
            self.first.set()
            if not isinstance(item, LlmToken):
                self.done.set()

        self.sub = await self.client.nc.subscribe(self.subject, cb=on_msg)
        await self.client.nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.unsubscribe()

    @property
    def tokens(self) -> list[LlmToken]:
        return [i for i in self.items if isinstance(i, LlmToken)]


async def test_initialize_generate_stream_release(service, client):
    h = await initialize(client, model_id=BUNDLED)
    assert h.handle and h.model_id == BUNDLED and h.model_path.endswith(".gguf") and h.context_size == 2048
    messages = [ChatTurnIn("system", "You are terse."), ChatTurnIn("user", "Name a colour.")]

    result = await client.call(LlmGenerate(handle=h.handle, messages=messages, params=GREEDY,
                                                              request_id="plain-1"), timeout=120)
    assert (result.request_id, result.handle, result.model_id) == ("plain-1", h.handle, BUNDLED)
    assert result.text.strip() and 0 < result.tokens <= 8
    assert result.finish_reason in ("stop", "length", "stop_sequence")
    assert result.usage.completion_tokens == result.tokens and result.usage.prompt_tokens > 0
    assert result.timing.tokens_per_second > 0

    async with Stream(client) as stream:
        streamed = await client.call(LlmGenerateStream(
            handle=h.handle, messages=messages, params=GREEDY, subject=stream.subject), timeout=120)
        with anyio.fail_after(10):
            await stream.done.wait()
    tokens = stream.tokens
    assert [t.seq for t in tokens] == list(range(len(tokens))) and tokens
    assert all(t.request_id == streamed.request_id for t in tokens)
    assert "".join(t.text for t in tokens if t.channel == "content") == streamed.text
    assert stream.items[-1] == streamed  # the result is published on the subject too, after the last chunk
    assert streamed.text == result.text  # greedy: the same answer both ways

    # Raw completion with a prompt instead of messages.
    raw_result = await client.call(LlmGenerate(
        handle=h.handle, prompt="The sky is", params=GenerationParams(max_tokens=2, temperature=0.0)), timeout=120)
    assert raw_result.tokens > 0 and raw_result.request_id  # an id is made up when none is given

    assert await client.call(LlmRelease(handle=h.handle)) == LlmReleased(
        handle=h.handle)
    status, body = await raw(client, "llm.release", msgspec.json.encode(LlmRelease(handle=h.handle)))
    assert status == "404" and body["code"] == "not_found"
    gone = await error(client, LlmGenerate(handle=h.handle, prompt="hi", params=GREEDY))
    assert gone.code is ErrorCode.NOT_FOUND and gone.details["field"] == "$.handle"


async def test_initialize_refusals_and_model_path(service, client):
    assert (await error(client, LlmInitialize(model_id="ghost"))).code is ErrorCode.MODEL_NOT_FOUND
    both = await error(client, LlmInitialize(model_id=BUNDLED, model_path="/x.gguf"))
    assert both.code is ErrorCode.BAD_REQUEST and both.details["field"] == "$.modelId"
    outside = await error(client, LlmInitialize(model_path="/etc/hostname"))
    assert outside.code is ErrorCode.BAD_REQUEST and outside.details["field"] == "$.modelPath"
    # The runtime's own handles (which diagnostics shows) are not this API's to use.
    diag = await client.call(DiagnosticsGet())
    assert diag.api.llm_handles == []
    # A registered model's file by path, with a load override.
    model = (await client.call(ModelsList())).models[0]
    h = await initialize(client, model_path=model.model_path, context_size=512)
    assert (h.model_id, h.context_size) == (BUNDLED, 512)
    assert (await client.call(DiagnosticsGet())).api.llm_handles == [h.handle]
    empty = await error(client, LlmGenerate(handle=h.handle, params=GREEDY))
    assert empty.code is ErrorCode.BAD_REQUEST and empty.details["field"] == "$.messages"
    await client.call(LlmRelease(handle=h.handle))


async def test_a_long_generation_does_not_hold_up_other_requests(service, client):
    h = await initialize(client, model_id=BUNDLED)
    counting = GenerationParams(max_tokens=2000, temperature=0.0, stop=[])
    async with Stream(client) as stream, anyio.create_task_group() as tg:
        long_result: list[LlmResult] = []

        async def long_generation() -> None:
            long_result.append(await client.call(LlmGenerateStream(
                handle=h.handle, prompt="1, 2, 3, 4, 5, 6, 7,", params=counting, subject=stream.subject,
                request_id="long"), timeout=300))

        tg.start_soon(long_generation)
        with anyio.fail_after(120):
            await stream.first.wait()
        # While it streams: another endpoint, and the same endpoint again, answer.
        listing = await client.call(ModelsList())
        assert listing.active_model_id == BUNDLED
        short = await client.call(LlmGenerate(handle=h.handle, prompt="Hello", params=GREEDY), timeout=120)
        assert short.tokens > 0
        assert "long" in (await client.call(DiagnosticsGet())).api.llm_running
        busy = await error(client, LlmGenerate(handle=h.handle, prompt="x", request_id="long"))
        assert busy.code is ErrorCode.CONFLICT and busy.details["field"] == "$.requestId"
        # It is still running now (cancelling a finished one would be not_found).
        cancelled = await client.call(LlmCancel(request_id="long"))
        assert cancelled == LlmCancelReply(request_id="long", cancelled=True)
    (result,) = long_result
    assert result.finish_reason == "cancelled" and 0 < result.tokens < 2000
    tokens = stream.tokens
    assert [t.seq for t in tokens] == list(range(len(tokens)))
    assert "".join(t.text for t in tokens) == result.text
    assert stream.items[-1] == result
    assert (await error(client, LlmCancel(request_id="long"))).code is ErrorCode.NOT_FOUND
    await client.call(LlmRelease(handle=h.handle))


async def test_a_stream_that_fails_midway_is_announced_on_its_subject(service, client):
    h = await initialize(client, model_id=BUNDLED)
    counting = GenerationParams(max_tokens=2000, temperature=0.0, stop=[])
    async with Stream(client) as stream, anyio.create_task_group() as tg:
        failure: list[Exception] = []

        async def long_generation() -> None:
            failure.append(await error(client, LlmGenerateStream(
                handle=h.handle, prompt="1, 2, 3, 4, 5,", params=counting, subject=stream.subject,
                request_id="doomed"), timeout=300))

        tg.start_soon(long_generation)
        with anyio.fail_after(120):
            await stream.first.wait()
        # Releasing the only handle stops the model's worker under the running generation.
        await client.call(LlmRelease(handle=h.handle), timeout=60)
        with anyio.fail_after(60):
            await stream.done.wait()
    (exc,) = failure
    last = stream.items[-1]
    assert isinstance(last, LlmFailed) and last.request_id == "doomed"
    assert last.error.code == exc.code and exc.code is not ErrorCode.BAD_REQUEST
    tokens = stream.tokens
    assert tokens and [t.seq for t in tokens] == list(range(len(tokens)))


async def test_a_refused_stream_publishes_nothing(service, client):
    async with Stream(client) as stream:
        exc = await error(client, LlmGenerateStream(
            handle="ctx-unknown", prompt="hi", params=GREEDY, subject=stream.subject))
        assert exc.code is ErrorCode.NOT_FOUND
        await client.nc.flush()
    assert stream.items == []
