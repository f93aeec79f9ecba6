"""The published contract (docs/asyncapi.yaml, docs/schemas/) is what the code says (issue 15)."""

from __future__ import annotations

import json

import yaml

from bus.schema import DOCS, asyncapi, render
from wire.api import ENDPOINTS


def test_the_committed_schema_files_are_not_stale() -> None:
    files = render()
    stale = [str(p.relative_to(DOCS.parent)) for p, text in files.items() if not p.exists() or p.read_text() != text]
    extra = {p.name for p in (DOCS / "schemas").glob("*.json")} - {p.name for p in files}
    assert not stale and not extra, (
        f"stale: {stale}, not generated any more: {sorted(extra)}; run `.venv/bin/python -m bus.schema`")


def test_every_endpoint_and_topic_subject_is_in_the_asyncapi_document() -> None:
    doc = yaml.safe_load((DOCS / "asyncapi.yaml").read_text())
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values()}
    for kind in ("msg", "tok", "evt", "cancel"):
        assert "{prefix}.topic.{topic}." + kind in addresses
    for spec in ENDPOINTS:
        assert "{prefix}.api." + spec.name in addresses
        op = doc["operations"][spec.name]
        assert op["reply"]["messages"][0]["$ref"].endswith("/" + spec.reply.__name__)
    # Every $ref resolves inside the document.
    for ref in set(_refs(doc)):
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]  # a KeyError names the broken reference


def test_a_payload_validates_against_its_published_schema() -> None:
    # The schema msgspec publishes is the one its decoder enforces: spot-check one field path.
    schema = json.loads((DOCS / "schemas" / "ChatMessage.json").read_text())
    chat = schema["$defs"]["ChatMessage"]
    assert {"id", "topic", "authorId", "text", "sentAt", "type"} <= set(chat["properties"])
    assert chat["properties"]["topic"]["pattern"] == "^[A-Za-z0-9_-]{1,128}$"
    assert asyncapi()["info"]["title"] == "lamabus"


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)
