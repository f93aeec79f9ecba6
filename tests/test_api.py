"""lama.api.* against the whole service on a real nats-server: registry, catalogue and topic endpoints."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import pytest

from bus.client import LamabusClient
from handlers.catalog import KNOWN_MODELS
from tests.test_registry import write_gguf
from wire.api import (
    ApiRequest,
    CatalogList,
    DiagnosticsGet,
    ModelActivate,
    ModelGet,
    ModelImport,
    ModelLoad,
    ModelRemove,
    ModelsList,
    ModelUnload,
    ModelUpdate,
    Progress,
    TopicBind,
    TopicCreate,
    TopicGet,
    TopicList,
    TopicUpdate,
)
from wire.errors import ErrorCode, LamaError
from wire.identity import person_id_for
from wire.params import GenerationParams

BUNDLED = KNOWN_MODELS[-1].id  # smollm2-135m-instruct

ENDPOINTS = {
    "models.list", "models.get", "models.import", "models.pull", "models.update", "models.activate",
    "models.remove", "models.load", "models.unload", "catalog.list", "topics.create", "topics.get", "topics.list",
    "topics.bind", "topics.update", "topics.analysis", "llm.initialize", "llm.generate", "llm.generate_stream",
    "llm.cancel", "llm.release", "diagnostics", "metrics",
}
"""Spelled out once here, on purpose: the table in wire/api.py must not lose or rename one unnoticed."""


async def raw(client: LamabusClient, endpoint: str, payload: bytes, timeout: float = 30.0) -> tuple[str | None, dict]:
    """(the Nats-Service-Error-Code header, the decoded body) of one request."""
    reply = await client.nc.request(f"{client.subjects.api}.{endpoint}", payload, timeout=timeout)
    return (reply.headers or {}).get("Nats-Service-Error-Code"), msgspec.json.decode(reply.data)


async def error(client: LamabusClient, request: ApiRequest, timeout: float = 30.0) -> LamaError:
    with pytest.raises(LamaError) as exc:
        await client.call(request, timeout=timeout)
    return exc.value


def tiny_gguf(service, name: str = "tiny.gguf", salt: int = 0) -> Path:
    return write_gguf(service.settings.models_dir / name, salt=salt, n_floats=1024)


async def test_service_info_lists_every_endpoint(service, client):
    info = msgspec.json.decode((await client.nc.request("$SRV.INFO.lamabus", b"", timeout=5)).data)
    assert info["name"] == "lamabus"
    subjects = {e["subject"].removeprefix("lama.api.") for e in info["endpoints"]}
    assert subjects == ENDPOINTS
    assert {e["name"] for e in info["endpoints"]} >= {"models-list", "llm-generate_stream", "diagnostics"}
    assert all(e["metadata"]["description"] for e in info["endpoints"])


BAD_PAYLOADS = [
    ("models.get", b'{"modelId": 5}', "$.modelId"),
    ("models.get", b"{}", "$.modelId"),
    ("models.list", b'{"includeDeleted": true, "colour": "red"}', "$.colour"),
    ("models.update", b'{"modelId": "x", "generation": {"maxTokens": 0}}', "$.generation.maxTokens"),
    ("models.update", b'{"modelId": "x", "load": {"contextSize": "big"}}', "$.load.contextSize"),
    ("models.update", b'{"modelId": "x", "load": {"flashAttention": "maybe"}}', "$.load.flashAttention"),
    ("models.import", b'{"path": "a.gguf", "expectedSha256": "abc"}', "$.expectedSha256"),
    ("models.pull", b'{"ref": "x", "progressSubject": "lama.api.models.list"}', "$.progressSubject"),
    ("models.pull", b'{"ref": "x", "progressSubject": "a.>"}', "$.progressSubject"),
    ("topics.create", b'{"topicId": "has space"}', "$.topicId"),
    ("topics.bind", b'{"topicId": "t"}', "$.modelId"),
    ("topics.analysis", b'{"topicId": "t", "enabled": "no"}', "$.enabled"),
    ("llm.initialize", b"{}", "$.modelId"),
    ("llm.generate", b'{"handle": "h", "messages": [{"role": "robot", "content": "x"}]}', "$.messages[0].role"),
    ("llm.generate_stream", b'{"handle": "h", "prompt": "x", "subject": "$JS.API.INFO"}', "$.subject"),
    ("llm.generate_stream", b'{"handle": "h", "prompt": "x"}', "$.subject"),
    ("llm.release", b'{"handle": ""}', "$.handle"),
]


async def test_a_bad_payload_is_400_bad_request_naming_the_field(service, client):
    # One service for all cases: starting one per case would cost a second each.
    for endpoint, payload, field in BAD_PAYLOADS:
        status, body = await raw(client, endpoint, payload)
        assert status == "400", (endpoint, payload, body)
        assert body["code"] == "bad_request" and body["details"]["field"] == field, (endpoint, payload, body)


async def test_malformed_json_is_400(service, client):
    status, body = await raw(client, "models.list", b"{not json")
    assert status == "400" and body["code"] == "bad_request" and "malformed" in body["message"].lower()


async def test_models_list_and_get(service, client):
    listing = await client.call(ModelsList())
    assert [m.id for m in listing.models] == [BUNDLED] and listing.active_model_id == BUNDLED
    bundled = listing.models[0]
    assert bundled.active and bundled.person_id == person_id_for(BUNDLED)
    assert bundled.checksum == KNOWN_MODELS[-1].sha256 and bundled.provider == "bundled"
    got = await client.call(ModelGet(model_id=BUNDLED))
    assert got.model == bundled
    status, body = await raw(client, "models.get", b'{"modelId": "no-such-model"}')
    assert status == "404" and body["code"] == "model_not_found" and body["details"]["model_id"] == "no-such-model"


async def test_import_update_activate_remove(service, client):
    path = tiny_gguf(service)
    progress_subject = client.nc.new_inbox()
    sub = await client.nc.subscribe(progress_subject)
    imported = await client.call(ModelImport(
        path="tiny.gguf", name="Tiny One", generation=GenerationParams(temperature=0.5),
        progress_subject=progress_subject))
    m = imported.model
    assert (m.id, m.name, m.provider, m.temperature) == ("tiny-one", "Tiny One", "local", 0.5)
    assert m.checksum == hashlib.sha256(path.read_bytes()).hexdigest() and m.model_path == str(path.resolve())
    last = msgspec.json.decode((await sub.next_msg(timeout=5)).data, type=Progress)
    assert (last.operation, last.done, last.total) == ("import", path.stat().st_size, path.stat().st_size)
    await sub.unsubscribe()
    # The same file again: the record comes back, nothing new is stored.
    again = await client.call(ModelImport(path=str(path)))
    assert again.model.version == m.version

    assert (await error(client, ModelImport(path="/etc/hostname"))).code is ErrorCode.BAD_REQUEST
    assert (await error(client, ModelImport(path="nope.gguf"))).code is ErrorCode.MODEL_FILE_MISSING
    status, body = await raw(client, "models.import", b'{"path": "tiny.gguf", "expectedSha256": "' + b"ab" * 32 + b'"}')
    assert status == "400" and body["code"] == "model_invalid"

    updated = (await client.call(ModelUpdate(
        model_id="tiny-one", generation=GenerationParams(max_tokens=42), system_prompt="Be brief."))).model
    assert (updated.max_tokens, updated.temperature, updated.system_prompt) == (42, 0.5, "Be brief.")
    assert updated.version > m.version
    stale = await error(client, ModelUpdate(model_id="tiny-one", expected_version=m.version,
                                                             generation=GenerationParams(top_k=5)))
    assert stale.code is ErrorCode.CONFLICT
    status, body = await raw(client, "models.update", b'{"modelId": "tiny-one"}')
    assert status == "400" and body["details"]["field"] == "$.generation"
    cleared = (await client.call(ModelUpdate(model_id="tiny-one", system_prompt=None,
                                             expected_version=updated.version))).model
    assert cleared.system_prompt is None and cleared.max_tokens == 42
    status, body = await raw(client, "models.update", b'{"modelId": "ghost", "reset": true}')
    assert status == "404" and body["code"] == "model_not_found"

    active = (await client.call(ModelActivate(model_id="tiny-one"))).model
    assert active.active
    listing = await client.call(ModelsList())
    assert listing.active_model_id == "tiny-one"
    assert [x.active for x in listing.models if x.id == BUNDLED] == [False]

    removed = (await client.call(ModelRemove(model_id="tiny-one"))).model
    assert removed.deleted and not removed.active
    assert [x.id for x in (await client.call(ModelsList())).models] == [BUNDLED]
    everything = await client.call(ModelsList(include_deleted=True))
    assert {x.id for x in everything.models} == {BUNDLED, "tiny-one"} and everything.active_model_id is None
    assert (await error(client, ModelActivate(model_id="tiny-one"))).code is \
        ErrorCode.MODEL_NOT_FOUND
    assert (await error(client, ModelRemove(model_id="tiny-one"))).code is ErrorCode.MODEL_NOT_FOUND


@pytest.mark.model
async def test_load_and_unload(service, client):
    loaded = await client.call(ModelLoad(model_id=BUNDLED), timeout=120)
    assert loaded.model_id == BUNDLED and loaded.loaded == [BUNDLED]
    assert (await client.call(ModelGet(model_id=BUNDLED))).model.model_loaded
    unloaded = await client.call(ModelUnload(model_id=BUNDLED), timeout=60)
    assert unloaded.was_loaded and unloaded.loaded == []
    again = await client.call(ModelUnload(model_id=BUNDLED))
    assert not again.was_loaded
    record = (await client.call(ModelGet(model_id=BUNDLED))).model
    assert not record.model_loaded and record.last_initialized > 0
    for request in (ModelLoad(model_id="ghost"), ModelUnload(model_id="ghost")):
        assert (await error(client, request)).code is ErrorCode.MODEL_NOT_FOUND


async def test_a_model_that_cannot_load_is_model_load_failed_and_recorded(service, client):
    tiny_gguf(service)  # a valid GGUF header with no real weights: llama.cpp refuses it
    await client.call(ModelImport(path="tiny.gguf"))
    exc = await error(client, ModelLoad(model_id="tiny"), timeout=120)
    assert exc.code in (ErrorCode.MODEL_LOAD_FAILED, ErrorCode.MODEL_INVALID)
    record = (await client.call(ModelGet(model_id="tiny"))).model
    assert record.last_error is not None and record.last_error.startswith(exc.code.value)


async def test_catalog_list(service, client):
    catalog = await client.call(CatalogList())
    ids = [e.id for e in catalog.models]
    assert ids == [e.id for e in KNOWN_MODELS] and catalog.registered == [BUNDLED]
    tinyllama = catalog.models[0]
    assert tinyllama.download_url and tinyllama.download_url.endswith(".gguf") and tinyllama.generation is not None


async def test_topics(service, client):
    created = (await client.call(TopicCreate(topic_id="room-1", name="Room One",
                                                                created_by="ana", system_prompt="Be kind."))).topic
    assert (created.id, created.name, created.bound_model_id, created.model_id, created.created_by) == (
        "room-1", "Room One", None, BUNDLED, "ana")
    assert created.person_id == person_id_for(BUNDLED) and created.system_prompt == "Be kind."
    status, body = await raw(client, "topics.create", b'{"topicId": "room-1"}')
    assert status == "409" and body["code"] == "conflict"
    assert (await client.call(TopicGet(topic_id="room-1"))).topic == created
    status, body = await raw(client, "topics.get", b'{"topicId": "nowhere"}')
    assert status == "404" and body["code"] == "not_found"

    tiny_gguf(service)
    await client.call(ModelImport(path="tiny.gguf"))
    bound = (await client.call(TopicBind(topic_id="room-1", model_id="tiny"))).topic
    assert (bound.bound_model_id, bound.model_id, bound.person_id) == ("tiny", "tiny", person_id_for("tiny"))
    assert bound.version > created.version
    # Binding a topic that does not exist yet creates it.
    fresh = (await client.call(TopicBind(topic_id="room-2", model_id=BUNDLED))).topic
    assert fresh.bound_model_id == BUNDLED
    assert (await error(client, TopicBind(topic_id="room-1", model_id="ghost"))).code is \
        ErrorCode.MODEL_NOT_FOUND
    unbound = (await client.call(TopicBind(topic_id="room-1", model_id=None))).topic
    assert (unbound.bound_model_id, unbound.model_id) == (None, BUNDLED)
    with_model = (await client.call(TopicCreate(topic_id="room-3", model_id="tiny"))).topic
    assert with_model.bound_model_id == "tiny"
    topics = (await client.call(TopicList())).topics
    assert [t.id for t in topics] == ["room-1", "room-2", "room-3"]
    prompted = (await client.call(TopicUpdate(topic_id="room-2", system_prompt="Rhyme."))).topic
    assert prompted.system_prompt == "Rhyme."
    assert (await service.assistant.directory.resolve_model("room-2", None)).system_prompt == "Rhyme."
    cleared = (await client.call(TopicUpdate(topic_id="room-2", system_prompt=None))).topic
    assert cleared.system_prompt is None
    status, body = await raw(client, "topics.update", b'{"topicId": "room-2"}')
    assert status == "400" and body["details"]["field"] == "$.systemPrompt"


async def test_diagnostics_counts_errors_per_endpoint(service, client):
    await error(client, ModelGet(model_id="ghost"))
    diag = await client.call(DiagnosticsGet())
    assert diag.registry.active_model_id == BUNDLED
    assert diag.api.errors["lama.api.models.get.model_not_found"] >= 1
    assert diag.api.llm_handles == [] and diag.api.llm_running == []
