"""The published contract: ``docs/asyncapi.yaml`` (AsyncAPI 3) and ``docs/schemas/*.json``.

Generated from the same definitions the service runs on: the topic Structs of
:mod:`wire.messages` and the endpoint table of :mod:`wire.api`. A browser page or
another language's client is written from these files;
``tests/test_schema.py`` fails when the committed ones are stale. Regenerate with

    .venv/bin/python -m bus.schema
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from wire.api import ENDPOINTS, LlmFailed, LlmToken, Progress
from wire.errors import ErrorBody
from wire.messages import (
    TOPIC_ID_PATTERN,
    CancelReply,
    ChatMessage,
    GenerationCancel,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    GenerationToken,
    MessageRejected,
    TopicAnalysed,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
REF = "#/components/schemas/{name}"

#: Topic traffic: (channel id, address after the prefix, what flows there, description).
TOPIC_CHANNELS: list[tuple[str, str, list[type], str]] = [
    ("topicMessages", "topic.{topic}.msg", [ChatMessage],
     "Chat messages, durable in the JetStream stream LAMA_TOPICS: people's and the AI's replies (with replyTo)."),
    ("topicTokens", "topic.{topic}.tok", [GenerationToken],
     "The reply as it streams, core NATS only: seq 0, 1, 2, ... with no gaps per request."),
    ("topicEvents", "topic.{topic}.evt",
     [GenerationStarted, GenerationCompleted, GenerationFailed, GenerationCancelled, MessageRejected, TopicAnalysed],
     "What happened to each message, and the topic's analysis (title, keywords, summary, language) when one is "
     "made; durable in LAMA_TOPICS."),
    ("rejected", "rejected", [MessageRejected],
     "message.rejected for a message whose subject cannot carry an answer (its topic token is not "
     "publishable: a wildcard, bytes that are not UTF-8, ...)."),
]


def _message_name(t: type) -> str:
    return t.__name__


def _every_type() -> list[type]:
    seen: dict[str, type] = {}
    for _, _, types, _ in TOPIC_CHANNELS:
        for t in types:
            seen.setdefault(t.__name__, t)
    for t in (GenerationCancel, CancelReply, ErrorBody, LlmToken, LlmFailed, Progress):
        seen.setdefault(t.__name__, t)
    for spec in ENDPOINTS:
        seen.setdefault(spec.request.__name__, spec.request)
        seen.setdefault(spec.reply.__name__, spec.reply)
    return list(seen.values())


def asyncapi() -> dict[str, Any]:
    types = _every_type()
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    _machine_neutral(components)

    def prefix() -> dict[str, Any]:
        return {"description": "The subject prefix (setting `prefix`).", "default": "lama"}

    def topic() -> dict[str, Any]:
        return {"description": f"A topic id: {TOPIC_ID_PATTERN}."}

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages = {t.__name__: {"name": t.__name__, "payload": {"$ref": REF.format(name=t.__name__)}} for t in types}

    def msg_refs(ts: list[type]) -> dict[str, Any]:
        return {t.__name__: {"$ref": f"#/components/messages/{t.__name__}"} for t in ts}

    for cid, address, ts, description in TOPIC_CHANNELS:
        params = {"prefix": prefix(), **({"topic": topic()} if "{topic}" in address else {})}
        channels[cid] = {"address": "{prefix}." + address, "description": description, "parameters": params,
                         "messages": msg_refs(ts)}
    channels["topicCancel"] = {
        "address": "{prefix}.topic.{topic}.cancel", "parameters": {"prefix": prefix(), "topic": topic()},
        "description": "Stop a request (or whatever runs in the topic); request/reply, core NATS.",
        "messages": msg_refs([GenerationCancel])}
    channels["inbox"] = {"address": None, "description": "The requester's reply inbox.",
                         "messages": msg_refs([CancelReply, ErrorBody, *dict.fromkeys(s.reply for s in ENDPOINTS)])}
    operations["postMessage"] = {"action": "send", "channel": {"$ref": "#/channels/topicMessages"},
                                 "summary": "Post a chat message (JetStream publish, Nats-Msg-Id = the message id)."}
    for cid in ("topicMessages", "topicTokens", "topicEvents", "rejected"):
        operations[f"receive_{cid}"] = {"action": "receive", "channel": {"$ref": f"#/channels/{cid}"}}
    operations["cancel"] = {
        "action": "send", "channel": {"$ref": "#/channels/topicCancel"},
        "reply": {"channel": {"$ref": "#/channels/inbox"},
                  "messages": [{"$ref": "#/channels/inbox/messages/CancelReply"},
                               {"$ref": "#/channels/inbox/messages/ErrorBody"}]}}
    node_id = {"description": "A node's id (--node-id): that node answers, with no queue group in between."}
    for spec in ENDPOINTS:
        description = spec.description + (" (runs concurrently with other requests)" if spec.concurrent else "")
        reply = {"channel": {"$ref": "#/channels/inbox"},
                 "messages": [{"$ref": f"#/channels/inbox/messages/{spec.reply.__name__}"},
                              {"$ref": "#/channels/inbox/messages/ErrorBody"}]}
        for cid, address, params, op, note in (
                ("api." + spec.name, "{prefix}.api." + spec.name, {"prefix": prefix()}, spec.name, ""),
                ("api.node." + spec.name, "{prefix}.api.node.{nodeId}." + spec.name,
                 {"prefix": prefix(), "nodeId": node_id}, spec.name + ".onNode",
                 " On one named node (several nodes on a cluster).")):
            channels[cid] = {"address": address, "parameters": params, "description": description + note,
                             "messages": msg_refs([spec.request])}
            operations[op] = {"action": "send", "channel": {"$ref": f"#/channels/{cid}"},
                              "summary": spec.description + note, "reply": reply}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "lamabus",
            "version": "1",
            "description": "Local-LLM chat on NATS: topic traffic and the `lamabus` micro service's request/reply "
                           "API. JSON, camelCase, a `type` tag on every payload. An error reply carries the headers "
                           "Nats-Service-Error-Code (400, 404, 409, 429, 500, 503) and an ErrorBody. "
                           "Generated by `python -m bus.schema` from wire/; do not edit.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": components},
    }


def _machine_neutral(schemas: dict[str, Any]) -> None:
    """The files must not depend on the machine or the Python that wrote them: the default thread count is
    this machine's (min(4, physical cores)), and Python 3.13 strips a docstring's indentation where 3.11 and
    3.12 keep it, so every description is cleaned the way 3.13 does it."""
    threads = schemas.get("Defaults", {}).get("properties", {}).get("n_threads")
    if threads is not None:
        threads.pop("default", None)
    for schema in schemas.values():
        if isinstance(description := schema.get("description"), str):
            schema["description"] = inspect.cleandoc(description)


def json_schemas() -> dict[str, dict[str, Any]]:
    """One standalone JSON Schema per payload type, by file name."""
    out = {}
    for t in _every_type():
        schema = msgspec.json.schema(t)
        _machine_neutral(schema.get("$defs", {}))
        out[f"{t.__name__}.json"] = schema
    return out


def render() -> dict[Path, str]:
    """Every generated file and its text."""
    import yaml  # dev dependency: only generating and checking the docs needs it

    files = {DOCS / "asyncapi.yaml": "# Generated by `python -m bus.schema` from wire/; do not edit.\n"
             + yaml.safe_dump(asyncapi(), sort_keys=False, allow_unicode=True, width=120)}
    for name, schema in json_schemas().items():
        files[DOCS / "schemas" / name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def main() -> int:
    files = render()
    (DOCS / "schemas").mkdir(exist_ok=True)
    stale = {p for p in (DOCS / "schemas").glob("*.json")} - set(files)
    for path in stale:
        path.unlink()
    for path, text in files.items():
        path.write_text(text)
    print(f"wrote {len(files)} files under {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
