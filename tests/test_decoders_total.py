"""Every decoder of what arrives from outside is total: whatever the bytes, it returns a
value of its type or raises a ``bad_request`` LamaError, never anything else (issue 16).

Property-based (hypothesis): arbitrary bytes, arbitrary JSON, and valid messages mutated
field by field, with invalid UTF-8 and deep nesting mixed in. The same inputs go through
the real intake's accept step and the API boundary end to end in test_hostile_e2e.py.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.node.app import _cancel_decoder
from engine import protocol
from domain.events import decode_event as decode_stored_event
from wire.api import ENDPOINTS
from wire.decoding import decode_untrusted
from wire.errors import ErrorCode, LamaError
from wire.messages import decode_topic_event

API_DECODERS = {spec.subject("lama.api"): msgspec.json.Decoder(spec.request) for spec in ENDPOINTS}

DECODERS: dict[str, Callable[[bytes], Any]] = {
    "topic event": decode_topic_event,
    "cancel": lambda data: decode_untrusted(_cancel_decoder, data),
    "engine event frame": protocol.decode_event,
    "engine command frame": protocol.decode_command,
    "stored registry event": decode_stored_event,
    **{f"api {subject}": (lambda d, dec=dec: decode_untrusted(dec, d)) for subject, dec in API_DECODERS.items()},
}

VALID_CHAT = {
    "type": "chat.message", "id": "m-1", "topic": "t1", "authorId": "alice", "text": "hello",
    "sentAt": "2026-11-29T10:00:00Z", "params": {"maxTokens": 8, "temperature": 0.5, "stop": ["\n"]},
}
VALID_CANCEL = {"type": "generation.cancel", "topic": "t1", "requestId": "m-1"}
VALID_API = {"type": "models.get", "id": "smollm2"}

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40)
json_values = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)


# Past the decoder's recursion limit on every supported Python (3.11: about 1,000; 3.12 and 3.13: about 10,000).
TOO_DEEP = 20_000


def deep(depth: int, opener: str = "[") -> bytes:
    closer = "]" if opener == "[" else "}"
    if opener == "[":
        return (opener * depth + closer * depth).encode()
    return ('{"a":' * depth + "1" + closer * depth).encode()


NASTY: list[bytes] = [
    b"", b"\x00", b"\xff\xfe", b"{", b"[]", b"null", b'"just a string"', b"1e999999",
    deep(1100), deep(5000), deep(1100, "{"), deep(50_000),
    json.dumps({**VALID_CHAT, "unknown": None}).encode().replace(b"null", deep(2000)),
    json.dumps(VALID_CHAT).encode().replace(b"hello", b"hel\xff\xfelo"),
    json.dumps(VALID_CHAT).encode().replace(b"alice", b"\xc3\x28"),
    json.dumps(VALID_CHAT).encode().replace(b"t1", b"\xed\xa0\x80"),  # a UTF-8-encoded surrogate
    json.dumps({**VALID_CHAT, "text": "x" * 200_000}).encode(),
    b"\x81\xa1t\xa4load",  # msgpack of the right shape with the wrong body
]


def check(name: str, data: bytes) -> None:
    try:
        DECODERS[name](data)
    except LamaError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST, (name, data[:80], exc)
        assert isinstance(exc.message, str) and exc.message


@pytest.mark.parametrize("name", sorted(DECODERS))
@pytest.mark.parametrize("data", NASTY, ids=range(len(NASTY)))
def test_known_poison_is_a_coded_error(name: str, data: bytes) -> None:
    check(name, data)


@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(name: str, data: bytes) -> None:
    check(name, data)


@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values)
def test_arbitrary_json(name: str, value: Any) -> None:
    check(name, json.dumps(value).encode())


def _mutations() -> st.SearchStrategy[bytes]:
    base = st.sampled_from([VALID_CHAT, VALID_CANCEL, VALID_API])

    def mutate(doc: dict, key: str, value: Any, drop: bool) -> bytes:
        doc = dict(doc)
        if drop:
            doc.pop(key, None)
        else:
            doc[key] = value
        return json.dumps(doc).encode()

    json_mutation = base.flatmap(lambda doc: st.builds(
        mutate, st.just(doc), st.sampled_from([*doc, "extra", "type"]), json_values, st.booleans()))
    # Splice bytes that are not UTF-8 (or not JSON) anywhere into a valid message.
    spliced = st.builds(
        lambda doc, at, junk: (lambda raw: raw[: at % (len(raw) + 1)] + junk + raw[at % (len(raw) + 1):])(
            json.dumps(doc).encode()),
        base, st.integers(min_value=0, max_value=400), st.binary(min_size=1, max_size=6))
    return json_mutation | spliced


@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_mutations())
def test_mutated_valid_messages(name: str, data: bytes) -> None:
    check(name, data)


def test_the_valid_messages_still_decode() -> None:
    assert decode_topic_event(json.dumps(VALID_CHAT).encode()).text == "hello"
    assert decode_untrusted(_cancel_decoder, json.dumps(VALID_CANCEL).encode()).request_id == "m-1"


def test_a_non_utf8_field_names_the_problem() -> None:
    with pytest.raises(LamaError) as exc:
        decode_topic_event(json.dumps(VALID_CHAT).encode().replace(b"hello", b"he\xffllo"))
    assert exc.value.code is ErrorCode.BAD_REQUEST and "UTF-8" in exc.value.message


def test_nesting_in_an_unknown_field_is_skipped_below_the_limit() -> None:
    """Unknown fields are ignored (a newer client's); nesting there costs nothing until it is too deep."""
    event = decode_topic_event(json.dumps({**VALID_CHAT, "x": None}).encode().replace(b"null", deep(500)))
    assert event.text == VALID_CHAT["text"]


def test_deep_nesting_names_the_problem() -> None:
    with pytest.raises(LamaError) as exc:
        decode_topic_event(json.dumps({**VALID_CHAT, "x": None}).encode().replace(b"null", deep(TOO_DEEP)))
    assert exc.value.code is ErrorCode.BAD_REQUEST
