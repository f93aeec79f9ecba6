"""The OpenAI-compatible gateway (bus/gateway/, issue 23) with the official ``openai`` client against a real
``serve`` (in this process, on the test's own nats-server, the bundled model): what works, and what is refused."""

from __future__ import annotations

import asyncio
import collections
import io
import json
import random

import aiohttp
import anyio
import jsonschema
import msgspec
import nats
import openai
import pytest

from bus.config import Settings
from tests.conftest import entered_in_own_task
from tests.test_api import BUNDLED
from wire.api import LlmResult

pytestmark = pytest.mark.model

CHAT_KEY = "sk-chat-7f3a9c01d2"
ADMIN_KEY = "sk-admin-5e8b7d44a0"
ASK = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
GREEDY = {"temperature": 0.0, "seed": 1}
COLOUR = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"],
          "additionalProperties": False}


def gateway_settings(tmp_path, nats_url: str, **extra) -> Settings:
    keys = tmp_path / "openai.keys"
    keys.write_text(f"# the gateway's keys\nchat:{CHAT_KEY}\nadmin:{ADMIN_KEY}\n")
    options = {"analysis": False, "web": "off", "openai": "127.0.0.1:0", "openai_keys_file": str(keys), **extra}
    return Settings(nats_url=nats_url, data_dir=str(tmp_path / "data"), **options)


@pytest.fixture
async def gw(tmp_path, nats_url):
    from bus.node.app import LamabusService

    async with entered_in_own_task(LamabusService(gateway_settings(tmp_path, nats_url))) as svc:
        yield svc


def client_of(svc, key: str = CHAT_KEY) -> openai.AsyncOpenAI:
    """Use as ``async with``. No retries: a 429 or 503 must reach the test as it came."""
    return openai.AsyncOpenAI(base_url=f"{svc.openai.url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture
async def oa(gw):
    async with client_of(gw) as c:
        yield c


async def test_models_and_a_chat_completion(gw, oa):
    assert (gw.settings.openai_url_file.read_text().strip()) == gw.openai.url
    models = await oa.models.list()
    assert [m.id for m in models.data] == [BUNDLED] and models.data[0].owned_by
    assert (await oa.models.retrieve(BUNDLED)).id == BUNDLED

    reply = await oa.chat.completions.create(model=BUNDLED, messages=ASK, max_tokens=8, **GREEDY)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == BUNDLED
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    u = reply.usage
    assert u.completion_tokens > 0 and u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens >= 0

    # The same conversation again: the engine's cache already holds its prompt.
    again = await oa.chat.completions.create(model=BUNDLED, messages=ASK, max_tokens=8, **GREEDY)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0, again.usage

    # No model named (the openai package insists on one; other clients do not): the registry's active one.
    status, body = await post(gw, "/v1/chat/completions", {"messages": ASK, "max_tokens": 2, **GREEDY})
    assert status == 200 and body["model"] == BUNDLED and body["choices"][0]["message"]["content"]


async def test_streaming_gives_the_same_reply_with_usage_at_the_end(gw, oa):
    whole = await oa.chat.completions.create(model=BUNDLED, messages=ASK, max_completion_tokens=12, **GREEDY)
    stream = await oa.chat.completions.create(model=BUNDLED, messages=ASK, max_completion_tokens=12, stream=True,
                                              stream_options={"include_usage": True}, **GREEDY)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


async def test_json_schema_and_json_object_replies_parse(gw, oa):
    ask = [{"role": "user", "content": "What colour is the sky? Answer in JSON."}]
    reply = await oa.chat.completions.create(
        model=BUNDLED, messages=ask, max_tokens=40, temperature=0.0,
        response_format={"type": "json_schema", "json_schema": {"name": "colour", "schema": COLOUR, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), COLOUR)

    short = [{"role": "user", "content": 'What is 2 + 2? Reply with a JSON object like {"answer": 1}.'}]
    stream = await oa.chat.completions.create(model=BUNDLED, messages=short, max_tokens=300, temperature=0.0,
                                              stream=True, response_format={"type": "json_object"})
    chunks = [c async for c in stream]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), dict)

    bad = await _raises(openai.BadRequestError, oa.chat.completions.create(
        model=BUNDLED, messages=ask, response_format={"type": "json_schema",
                                                       "json_schema": {"name": "x", "schema": {"type": "martian"}}}))
    assert bad.body["param"] == "response_format" and bad.body["code"] == "bad_request"


async def test_text_completions(gw, oa):
    whole = await oa.completions.create(model=BUNDLED, prompt="The sky is", max_tokens=6, **GREEDY)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text and whole.usage.completion_tokens > 0
    stream = await oa.completions.create(model=BUNDLED, prompt="The sky is", max_tokens=6, stream=True, **GREEDY)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == whole.choices[0].text


async def test_a_client_that_leaves_cancels_its_generation_on_the_service(gw, oa):
    """Closing a stream, or giving up on a reply that is not streamed: the engine stops generating (the
    generation's own result, published on its inbox, says ``cancelled``)."""
    spy = await nats.connect(gw.url)
    results: dict[str, LlmResult] = {}
    arrived: dict[str, anyio.Event] = collections.defaultdict(anyio.Event)
    started: asyncio.Queue[str] = asyncio.Queue()

    async def on_msg(msg) -> None:  # every llm.* stream's chunks go to an inbox, where anyone may listen
        item = msgspec.json.decode(msg.data)
        if isinstance(item, dict) and item.get("type") == "llm.token" and item.get("seq") == 0:
            started.put_nowait(item["requestId"])
        elif isinstance(item, dict) and item.get("type") == "llm.result":
            result = msgspec.convert(item, LlmResult)
            results[result.request_id] = result
            arrived[result.request_id].set()

    await spy.subscribe("_INBOX.>", cb=on_msg)
    await spy.flush()
    count = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]
    try:
        stream = await oa.chat.completions.create(model=BUNDLED, messages=count, max_tokens=2000, temperature=0.0,
                                                  stop=[], stream=True)
        seen = 0
        async for chunk in stream:
            seen += 1
            if seen == 5:
                break
        await stream.close()
        with anyio.fail_after(30):
            await arrived[chunk.id].wait()  # the response id is the generation's request id on the bus
        assert results[chunk.id].finish_reason == "cancelled" and results[chunk.id].tokens < 2000
        with anyio.fail_after(10):
            while chunk.id in gw.api.llm.running:
                await anyio.sleep(0.05)  # the session forgets it as the engine hands the result back
        assert (await started.get()) == chunk.id

        waiting = asyncio.create_task(oa.chat.completions.create(model=BUNDLED, messages=count, max_tokens=2000,
                                                                 temperature=0.0, stop=[]))
        with anyio.fail_after(60):
            rid = await started.get()  # its first token: the engine is on it
        waiting.cancel()  # the HTTP connection closes under the gateway
        with anyio.fail_after(30):
            await arrived[rid].wait()
        assert results[rid].finish_reason == "cancelled" and results[rid].tokens < 2000
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        await spy.close()


async def test_errors_come_in_openai_s_shape_with_the_field_named(gw, oa):
    cases = [
        ({"temperature": 3.5}, "temperature"),
        ({"n": 2}, "n"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "messages[0].colour"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a"] * 9}, "stop"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"frequency_penalty": 1.0}, "frequency_penalty"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0].type"),
    ]
    for extra, param in cases:
        body = {"model": BUNDLED, "messages": ASK, **extra}
        exc = await _raises(openai.BadRequestError, oa.chat.completions.create(**body))
        assert exc.status_code == 400 and exc.body["param"] == param, (extra, exc.body)
        assert exc.body["type"] == "invalid_request_error" and exc.body["code"] and exc.body["message"]

    missing = await _raises(openai.NotFoundError, oa.chat.completions.create(model="ghost", messages=ASK))
    assert missing.body["code"] == "model_not_found" and missing.body["param"] == "model"
    assert (await _raises(openai.NotFoundError, oa.models.retrieve("ghost"))).body["code"] == "model_not_found"

    async with client_of(gw, "wrong-key-123456") as anon:
        assert (await _raises(openai.AuthenticationError, anon.models.list())).body["code"] == "invalid_api_key"
    async with aiohttp.ClientSession() as http:  # no key at all (the openai package always sends one)
        async with http.get(f"{gw.openai.url}/v1/models") as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "missing_api_key"
    # A chat key chats and lists models, nothing else; an admin key may delete (here: a model that is not there).
    forbidden = await _raises(openai.PermissionDeniedError, oa.models.delete(BUNDLED))
    assert forbidden.body["code"] == "forbidden"
    assert BUNDLED in [m.id for m in (await oa.models.list()).data]
    async with client_of(gw, ADMIN_KEY) as admin:
        assert (await _raises(openai.NotFoundError, admin.models.delete("ghost"))).body["code"] == "model_not_found"

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.openai.url}/v2/nothing", headers={"Authorization": f"Bearer {CHAT_KEY}"}) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_url"


async def test_any_bytes_in_the_body_get_a_coded_error(gw):
    """Never a 500, never a traceback: hostile and random bodies are 4xx with OpenAI's error object."""
    rng = random.Random(23)
    bodies = [b"", b"{", b"\xff\xfe\x00", b"[]", b"null", b"42", b'"x"', b"[" * 100_000, b'{"messages": "hi"}',
              b'{"messages": []}', b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}',
              b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
              b'{"messages": [{"role": "user", "content": "hi"}], "seed": 99999999999999999999999}',
              b'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}}',
              b'{"prompt": ["a", "b"]}', b"x" * (9 << 20)]
    bodies += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(40)]
    headers = {"Authorization": f"Bearer {CHAT_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        for path in ("/v1/chat/completions", "/v1/completions"):
            for body in bodies:
                data = io.BytesIO(body) if len(body) > 1 << 20 else body  # aiohttp warns of big raw bytes
                async with http.post(f"{gw.openai.url}{path}", data=data, headers=headers) as r:
                    payload = await r.json(content_type=None)
                    assert 400 <= r.status < 500, (path, body[:80], r.status, payload)
                    assert set(payload["error"]) == {"message", "type", "code", "param"}, payload
                    assert "Traceback" not in payload["error"]["message"]


async def test_too_many_at_once_is_429_with_retry_after(tmp_path, nats_url):
    from bus.node.app import LamabusService

    settings = gateway_settings(tmp_path, nats_url, openai_max_concurrent=1)
    async with entered_in_own_task(LamabusService(settings)) as svc, client_of(svc) as oa:
        stream = await oa.chat.completions.create(model=BUNDLED, messages=ASK, max_tokens=400, stream=True,
                                                  stop=[], temperature=0.0)
        first = await anext(aiter(stream))
        assert first.choices[0].delta.role == "assistant"
        limited = await _raises(openai.RateLimitError, oa.chat.completions.create(model=BUNDLED, messages=ASK))
        assert limited.response.headers["Retry-After"] == "1" and limited.body["code"] == "rate_limit_exceeded"
        await stream.close()


async def test_a_handle_unused_for_keep_alive_is_released(tmp_path, nats_url):
    """The gateway's handle keeps its model loaded on its node; unused for the service's keep_alive, it goes."""
    from bus.node.app import LamabusService

    settings = gateway_settings(tmp_path, nats_url, keep_alive=3.0)
    async with entered_in_own_task(LamabusService(settings)) as svc, client_of(svc) as oa:
        await oa.chat.completions.create(model=BUNDLED, messages=ASK, max_tokens=2, temperature=0.0)
        (handle,) = svc.api.llm.handles
        with anyio.fail_after(30):
            while svc.api.llm.handles:
                await anyio.sleep(0.1)  # the gateway looks every keep_alive / 4
        again = await oa.chat.completions.create(model=BUNDLED, messages=ASK, max_tokens=2, temperature=0.0)
        assert again.choices[0].message.content and list(svc.api.llm.handles) != [handle]


async def test_each_key_has_its_own_quota_on_the_service(tmp_path, nats_url):
    """The gateway names the key as the quota author: one key's running generation does not count
    against another key, and a second one on the same key is refused by the service (429)."""
    from bus.node.app import LamabusService

    settings = gateway_settings(tmp_path, nats_url, quota_running_per_author=1)
    async with entered_in_own_task(LamabusService(settings)) as svc, client_of(svc) as oa:
        stream = await oa.chat.completions.create(model=BUNDLED, messages=ASK, max_tokens=400, stream=True,
                                                  stop=[], temperature=0.0)
        assert (await anext(aiter(stream))).choices[0].delta.role == "assistant"
        limited = await _raises(openai.RateLimitError, oa.chat.completions.create(model=BUNDLED, messages=ASK))
        assert limited.body["code"] == "too_many_running" and int(limited.response.headers["Retry-After"]) >= 1
        async with client_of(svc, ADMIN_KEY) as other:
            reply = await other.chat.completions.create(model=BUNDLED, messages=ASK, max_tokens=3, **GREEDY)
            assert reply.choices[0].message.content is not None
        await stream.close()


async def test_no_model_is_503(tmp_path, nats_url):
    from bus.node.app import LamabusService

    settings = gateway_settings(tmp_path, nats_url, bundled_model=False)
    async with entered_in_own_task(LamabusService(settings)) as svc, client_of(svc) as oa:
        assert (await oa.models.list()).data == []
        status, body = await post(svc, "/v1/chat/completions", {"messages": ASK})
        assert status == 503 and body["error"]["code"] == "no_model_loaded"
        assert (await _raises(openai.NotFoundError, oa.chat.completions.create(model=BUNDLED, messages=ASK))).body[
            "code"] == "model_not_found"


async def post(svc, path: str, body: dict, key: str = CHAT_KEY) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{svc.openai.url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status, await r.json()


async def _raises(kind: type[openai.APIStatusError], call) -> openai.APIStatusError:
    with pytest.raises(kind) as exc:
        await call
    return exc.value
