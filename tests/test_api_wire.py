"""wire/api.py: the records mirror the registry's, field for field; requests refuse what they do not know."""

from __future__ import annotations

import msgspec
import pytest

from handlers.catalog import KNOWN_MODELS, CatalogEntry
from handlers.registry import TopicInfo
from domain.projections import LLM
from wire.api import (
    CatalogModel,
    LlmGenerate,
    LlmGenerateStream,
    ModelRecord,
    TopicBind,
    TopicRecord,
    valid_subject,
)


def test_replies_carry_the_registry_records_themselves():
    # One definition per record (wire/records.py): nothing to drift apart.
    assert ModelRecord is LLM and TopicRecord is TopicInfo and CatalogModel is CatalogEntry
    topic = TopicInfo(id="t", name=None, bound_model_id=None, model_id="m", person_id="p", created_by="u",
                      created=1, modified=2, message_count=3, reply_count=1, version=4, system_prompt="Be brief.")
    raw = msgspec.json.decode(msgspec.json.encode(topic))
    assert raw["boundModelId"] is None and raw["systemPrompt"] == "Be brief." and raw["messageCount"] == 3
    for entry in KNOWN_MODELS:
        assert msgspec.json.decode(msgspec.json.encode(entry), type=CatalogModel) == entry


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
