"""The OpenAI gateway's pure parts (bus/gateway/): keys and roles, the error table, the thinking channel in
replies and chunks. The gateway against a real serve is tests/test_openai_gateway.py."""

from __future__ import annotations

import msgspec
import pytest

from bus.gateway.auth import Keys, may
from bus.gateway.errors import OpenAIError, from_lama, param_of
from bus.gateway.responses import ChunkWriter, chat_completion
from wire.api import LlmResult, LlmToken
from wire.errors import ErrorCode, LamaError
from wire.messages import Timing, Usage

SECRET = "sk-units-90f1e2d3c4"


def test_keys_map_to_roles_and_never_show_in_errors_or_repr():
    keys = Keys.parse(f"# comment\nchat:{SECRET}\nadmin:sk-admin-123456789", source="test")
    assert len(keys) == 2 and SECRET not in repr(keys)
    assert keys.role_of(f"Bearer {SECRET}") == "chat" and keys.role_of("bearer sk-admin-123456789") == "admin"
    refusals = ((None, "missing_api_key"), ("Basic abc", "invalid_api_key"), ("Bearer nope-nope-1", "invalid_api_key"))
    for header, code in refusals:
        with pytest.raises(OpenAIError) as exc:
            keys.role_of(header)
        assert exc.value.status == 401 and exc.value.code == code
    with pytest.raises(OpenAIError) as forbidden:
        keys.check(f"Bearer {SECRET}", "models.remove")
    assert forbidden.value.status == 403 and SECRET not in forbidden.value.message
    keys.check("Bearer sk-admin-123456789", "models.remove")
    assert Keys().role_of(None) is None  # no keys configured: everything is let through (on loopback)
    for bad in (f"wizard:{SECRET}", f"chat {SECRET}", "chat:short", f"chat:{SECRET} x"):
        with pytest.raises(LamaError) as refused:
            Keys.parse(bad, source="LAMABUS_OPENAI_KEYS")
        assert SECRET not in str(refused.value) and refused.value.details["entry"] == 1


def test_roles_follow_the_bus_roles():
    assert may("chat", "chat") and may("chat", "completions") and may("chat", "models.list")
    assert not may("chat", "models.remove") and may("admin", "models.remove")


def test_lamabus_errors_map_onto_openai_statuses_and_fields():
    cases = [
        (LamaError(ErrorCode.BAD_REQUEST, "x", field="$.params.maxTokens"), 400, "max_tokens"),
        (LamaError(ErrorCode.BAD_REQUEST, "x", field="params.jsonSchema"), 400, "response_format"),
        (LamaError(ErrorCode.MODEL_NOT_FOUND, "x"), 404, "model"),
        (LamaError(ErrorCode.BUSY, "x", retryAfterMs=2500), 429, None),
        (LamaError(ErrorCode.NOT_FOUND, "node a stopped", node="a"), 503, None),
        (LamaError(ErrorCode.OUT_OF_MEMORY, "x"), 503, None),
        (LamaError(ErrorCode.INTERNAL, "x"), 500, None),
    ]
    for exc, status, param in cases:
        err = from_lama(exc)
        assert (err.status, err.param) == (status, param), exc
        assert set(msgspec.json.decode(err.encode())["error"]) == {"message", "type", "code", "param"}
    assert from_lama(cases[3][0]).headers() == {"Retry-After": "3"}
    assert param_of("$.messages[2].content", wire=False) == "messages[2].content"


def _result(thinking: str) -> LlmResult:
    return LlmResult(request_id="chatcmpl-1", handle="a:h", model_id="m", text="Hi.", thinking=thinking, tokens=3,
                     finish_reason="stop_sequence", usage=Usage(5, 3, 8, 4),
                     timing=Timing(start_time=0, end_time=1, elapsed_time=1, tokens_per_second=3,
                                   time_to_first_token=1))


def test_the_thinking_channel_is_reasoning_content():
    reply = chat_completion("chatcmpl-1", "m", 0, _result("Let me think."))
    message = reply["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hi.", "reasoning_content": "Let me think."}
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    assert "reasoning_content" not in chat_completion("chatcmpl-1", "m", 0, _result(""))["choices"][0]["message"]

    writer = ChunkWriter("chatcmpl-1", "m", 0, chat=True, include_usage=False)
    think = msgspec.json.decode(writer.token(LlmToken(request_id="chatcmpl-1", seq=0, text="Hm", channel="thinking")))
    said = msgspec.json.decode(writer.token(LlmToken(request_id="chatcmpl-1", seq=1, text="Hi")))
    assert think["choices"][0]["delta"] == {"reasoning_content": "Hm"}
    assert said["choices"][0]["delta"] == {"content": "Hi"}
    text = ChunkWriter("cmpl-1", "m", 0, chat=False, include_usage=True)
    last = [msgspec.json.decode(c) for c in text.last(_result(""))]
    assert last[0]["choices"][0]["finish_reason"] == "stop" and last[1]["choices"] == [] and last[1]["usage"]
