"""wire/api.py: the records mirror the registry's, field for field; requests refuse what they do not know."""

from __future__ import annotations

import msgspec
import pytest

from bus.api import _record
from handlers.catalog import KNOWN_MODELS, CatalogEntry
from handlers.registry import TopicInfo
from storage.projections import LLM
from wire.api import (
    CatalogModel,
    LlmGenerate,
    LlmGenerateStream,
    ModelRecord,
    TopicBind,
    TopicRecord,
    valid_subject,
)


def _shape(cls: type) -> list[tuple]:
    return [(f.name, f.encode_name, f.type, f.default, f.default_factory) for f in msgspec.structs.fields(cls)]


@pytest.mark.parametrize(("mirror", "source"), [(ModelRecord, LLM), (TopicRecord, TopicInfo),
                                                (CatalogModel, CatalogEntry)])
def test_records_mirror_the_registry_types(mirror: type, source: type):
    assert _shape(mirror) == _shape(source), f"{source.__qualname__} changed: update wire.api.{mirror.__name__}"
    assert mirror.__struct_config__.omit_defaults == source.__struct_config__.omit_defaults


def test_records_encode_the_same_through_the_mirror():
    for entry in KNOWN_MODELS:
        assert msgspec.json.encode(_record(entry, CatalogModel)) == msgspec.json.encode(entry)
    topic = TopicInfo(id="t", name=None, bound_model_id=None, model_id="m", person_id="p", created_by="u",
                      created=1, modified=2, message_count=3, reply_count=1, version=4, system_prompt="Be brief.")
    assert msgspec.json.encode(_record(topic, TopicRecord)) == msgspec.json.encode(topic)


def test_requests_are_camel_case_and_tagged():
    req = LlmGenerateStream(handle="h", prompt="p", subject="_INBOX.abc", request_id="r1")
    raw = msgspec.json.decode(msgspec.json.encode(req))
    assert raw == {"type": "llm.generate_stream", "handle": "h", "prompt": "p", "subject": "_INBOX.abc",
                   "requestId": "r1"}
    # The tag may be left out; when given it must match.
    assert msgspec.json.decode(b'{"handle":"h","prompt":"p"}', type=LlmGenerate).prompt == "p"
    with pytest.raises(msgspec.ValidationError, match=r"\$\.type"):
        msgspec.json.decode(b'{"type":"llm.release","handle":"h","prompt":"p"}', type=LlmGenerate)


def test_unbinding_must_be_said_explicitly():
    with pytest.raises(msgspec.ValidationError, match="modelId"):
        msgspec.json.decode(b'{"topicId":"t"}', type=TopicBind)
    assert msgspec.json.decode(b'{"topicId":"t","modelId":null}', type=TopicBind).model_id is None


@pytest.mark.parametrize(("subject", "ok"), [("_INBOX.x1", True), ("my.progress-1", True), ("a", True),
                                              ("a.*", False), ("a.>", False), ("$JS.API.STREAM.DELETE.X", False),
                                              ("a..b", False), ("", False), ("a b", False), (".a", False)])
def test_subjects_a_caller_may_name(subject: str, ok: bool):
    assert valid_subject(subject) is ok
