"""Grammar and JSON-schema constrained replies (issue 13, part 1).

The pure part (which tokens a grammar judges, how the params layer) runs without a model;
the rest runs the bundled SmolLM2 through the engine, batched, and validates every reply
with the ``jsonschema`` library.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import msgspec
import pytest

from engine.runtime import Engine
from engine.text import TextPipeline
from engine.types import ChatTurn, GenerateRequest, GenerationResult, ModelConfig
from wire.errors import ErrorCode, LamaError
from wire.params import DEFAULTS, GenerationParams, SamplingParams

PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "species": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer"},
    },
    "required": ["name", "species", "age"],
    "additionalProperties": False,
}
YES_NO = 'root ::= "yes" | "no"'


# ---- without a model ------------------------------------------------------------------


def test_params_carry_a_grammar_or_a_schema_never_both():
    decode = msgspec.json.Decoder(GenerationParams).decode
    assert decode(b'{"grammar": "root ::= \\"a\\""}').grammar == 'root ::= "a"'
    assert decode(b'{"jsonSchema": {"type": "object"}}').json_schema == {"type": "object"}
    with pytest.raises(msgspec.ValidationError, match="grammar or jsonSchema, not both"):
        decode(b'{"grammar": "root ::= \\"a\\"", "jsonSchema": {}}')
    with pytest.raises(msgspec.ValidationError):
        decode(b'{"grammar": ""}')


def test_a_layer_that_sets_a_constraint_replaces_both_of_the_lower_layer():
    model = GenerationParams(json_schema=PET, temperature=0.2)
    message = GenerationParams(grammar=YES_NO)
    s = SamplingParams.resolve(message, model)
    assert (s.grammar, s.json_schema, s.temperature) == (YES_NO, None, 0.2)
    s = SamplingParams.resolve(GenerationParams(max_tokens=5), model)
    assert (s.grammar, s.json_schema) == (None, PET)


def test_under_a_grammar_the_default_stop_sequences_do_not_apply():
    assert SamplingParams.resolve().stop == DEFAULTS.stop
    assert SamplingParams.resolve(GenerationParams(grammar=YES_NO)).stop == ()
    assert SamplingParams.resolve(GenerationParams(json_schema=PET, stop=["END"])).stop == ("END",)


def test_the_grammar_judges_content_tokens_not_a_thinking_block():
    p = TextPipeline(start_in_thinking=True)
    for piece in (b"Let me", b" think.", b"</think>"):
        assert not p.takes_grammar(piece)
        p.feed(piece)
    assert not p.takes_grammar(b"\n\n")  # dropped from the content anyway
    p.feed(b"\n\n")
    assert p.takes_grammar(b"{")
    p.feed(b"{")
    assert p.takes_grammar(b" ") and p.takes_grammar(b"<think>")  # the content has begun: all judged
    assert p.thinking == "Let me think." and p.content == "{"


def test_a_reply_may_open_a_thinking_block_before_its_content():
    p = TextPipeline()
    assert not p.takes_grammar(b"<think>")
    p.feed(b"<think>")
    assert p.in_thinking and not p.takes_grammar(b"hmm")
    q = TextPipeline()
    assert q.takes_grammar(b"\n")  # no thinking block: leading whitespace is content
    assert q.takes_grammar(b"<think>")  # ... and after that, so is a tag


# ---- with the bundled model --------------------------------------------------------------


def chat(rid: str, question: str, **params) -> GenerateRequest:
    sampling = SamplingParams.resolve(GenerationParams(**params))
    return GenerateRequest(rid, sampling, messages=(ChatTurn("user", question),))


@pytest.fixture
async def engine_handle(model_path: Path):
    async with Engine() as engine:
        handle = await engine.initialize(ModelConfig(str(model_path), n_ctx=512, n_seq_max=8))
        yield engine, handle


@pytest.mark.model
@pytest.mark.timeout(900)  # minutes of model work; 2 to 3 on a busy 2-core machine
async def test_a_schema_with_required_fields_and_an_enum_holds_for_20_seeds_in_one_batch(engine_handle):
    engine, handle = engine_handle
    question = "Invent a pet. Reply with its name, species and age as JSON."
    results = await asyncio.gather(*(
        engine.generate(handle, chat(f"pet-{seed}", question, json_schema=PET, seed=seed, temperature=0.9,
                                     max_tokens=80))
        for seed in range(20)
    ))
    validator = jsonschema.Draft202012Validator(PET)
    for seed, r in enumerate(results):
        assert r.finish_reason == "stop", (seed, r.text)
        reply = json.loads(r.text)
        validator.validate(reply)
    assert len({r.text for r in results}) > 1, "20 seeds gave one reply: the seeds did not reach the sampler"


@pytest.mark.model
async def test_a_yes_no_grammar(engine_handle):
    engine, handle = engine_handle
    for rid, question in (("sky", "Is the sky blue? Answer yes or no."), ("fish", "Can fish climb trees?")):
        result = await engine.generate(handle, chat(rid, question, grammar=YES_NO, temperature=0.0))
        assert result.text in ("yes", "no") and result.finish_reason == "stop", result


@pytest.mark.model
@pytest.mark.parametrize(
    ("params", "field", "reason"),
    [
        ({"grammar": 'root ::= "a'}, "params.grammar", "unexpected end of input"),
        ({"grammar": 'root ::= root "a"'}, "params.grammar", "left recursion"),
        ({"grammar": 'root ::= other'}, "params.grammar", "Undefined rule identifier 'other'"),
        ({"grammar": 'start ::= "a"'}, "params.grammar", "'root'"),
        ({"json_schema": {"type": "martian"}}, "params.jsonSchema", "Unrecognized schema"),
    ],
)
async def test_a_bad_grammar_or_schema_is_a_bad_request_before_any_token(engine_handle, params, field, reason):
    engine, handle = engine_handle
    items = []
    with pytest.raises(LamaError) as exc:
        async for item in engine.generate_stream(handle, chat("bad", "Hi", **params)):
            items.append(item)
    assert items == []
    assert exc.value.code == ErrorCode.BAD_REQUEST
    assert exc.value.details["field"] == field
    assert reason in exc.value.message, exc.value.message
    # The worker is unharmed and the next request runs.
    ok = await engine.generate(handle, chat("after", "Hi", grammar=YES_NO, temperature=0.0))
    assert ok.text in ("yes", "no")


@pytest.mark.model
async def test_grammar_and_schema_together_are_refused(engine_handle):
    engine, handle = engine_handle
    sampling = msgspec.structs.replace(SamplingParams.resolve(), grammar=YES_NO, json_schema=PET)
    with pytest.raises(LamaError) as exc:
        await engine.generate(handle, GenerateRequest("both", sampling, prompt="Hi"))
    assert exc.value.code == ErrorCode.BAD_REQUEST and exc.value.details["field"] == "params.grammar"


@pytest.mark.model
async def test_a_thinking_block_passes_unconstrained_and_the_grammar_starts_after_it(engine_handle):
    # A raw prompt that opens a thinking block (as a reasoning model's template does), with
    # examples of what follows it: the thought itself is free text the grammar would never allow.
    engine, handle = engine_handle
    prompt = (
        "Q: Is fire hot?\nA: <think>Fire burns wood, so it is hot.</think>{\"answer\": \"yes\"}\n"
        "Q: Is ice hot?\nA: <think>Ice is frozen water, so it is cold.</think>{\"answer\": \"no\"}\n"
        "Q: Is the sun bright?\nA: <think>"
    )
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    sampling = SamplingParams.resolve(GenerationParams(json_schema=schema, temperature=0.0, max_tokens=60))
    chunks = []
    result = None
    async for item in engine.generate_stream(handle, GenerateRequest("think", sampling, prompt=prompt)):
        if isinstance(item, GenerationResult):
            result = item
        else:
            chunks.append(item)
    assert result is not None and result.finish_reason == "stop", result
    assert result.thinking.strip() and not result.thinking.lstrip().startswith("{"), result
    jsonschema.validate(json.loads(result.text), schema)
    assert "".join(c.text for c in chunks if c.channel == "content") == result.text
