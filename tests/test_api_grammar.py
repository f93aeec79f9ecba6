"""params.grammar / params.jsonSchema over lama.api.llm.generate (issue 13, part 1), with the bundled model."""

from __future__ import annotations

import json

import jsonschema
import msgspec
import pytest

from tests.test_api import BUNDLED, error, raw
from tests.test_api_llm import initialize
from wire.api import LlmGenerate, LlmRelease
from wire.errors import ErrorCode, LamaError
from wire.messages import GenerationCompleted, GenerationStarted
from wire.params import GenerationParams

pytestmark = pytest.mark.model

COLOUR = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]}


async def test_constrained_generation_over_the_bus(service, client):
    h = await initialize(client, model_id=BUNDLED)
    ask = "What colour is the sky? Answer in JSON."

    result = await client.call(LlmGenerate(
        handle=h.handle, prompt=ask, params=GenerationParams(json_schema=COLOUR, temperature=0.0, max_tokens=30)), timeout=120)
    jsonschema.validate(json.loads(result.text), COLOUR)

    bad = await error(client, LlmGenerate(
        handle=h.handle, prompt=ask, params=GenerationParams(grammar='root ::= "a" | (')), timeout=120)
    assert bad.code is ErrorCode.BAD_REQUEST and bad.details["field"] == "params.grammar"
    assert "expecting" in bad.message

    both = {"handle": h.handle, "prompt": ask, "params": {"grammar": 'root ::= "a"', "jsonSchema": COLOUR}}
    status, body = await raw(client, "llm.generate", msgspec.json.encode(both))
    assert status == "400" and body["code"] == "bad_request" and "not both" in body["message"]

    await client.call(LlmRelease(handle=h.handle))


@pytest.mark.parametrize(("params", "field"), [
    (GenerationParams(grammar='root ::= "a" | ('), "params.grammar"),
    (GenerationParams(json_schema={"type": "martian"}), "params.jsonSchema"),
])
async def test_a_chat_message_with_a_bad_grammar_is_refused_before_generation_started(service, client, params, field):
    """No generation.started may precede the refusal: a client would show a reply that never comes."""
    seen: list[object] = []
    with pytest.raises(LamaError) as exc:
        async for item in client.ask("bad-grammar", "What colour is the sky?", params=params, timeout=120):
            seen.append(item)
    assert seen == []
    assert exc.value.code is ErrorCode.BAD_REQUEST and exc.value.details["field"] == field
    # The topic goes on: a good constrained message is announced, then answered within its schema.
    good = GenerationParams(json_schema=COLOUR, temperature=0.0, max_tokens=30)
    items = [i async for i in client.ask("bad-grammar", "What colour is the sky?", params=good, timeout=120)]
    assert isinstance(items[0], GenerationStarted) and isinstance(items[-1], GenerationCompleted)
    jsonschema.validate(json.loads(items[-1].text), COLOUR)
