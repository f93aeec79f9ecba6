"""Registry commands on a real SQLite file, with crafted GGUF files."""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from datetime import datetime, timezone
from pathlib import Path

import msgspec
import pytest

from engine.types import ChatTurn, ModelConfig
from handlers.directory import RegistryDirectory
from handlers.registry import BUNDLED_NAME, Registry
from domain.events import ModelActivated, ModelDeactivated
from domain.mapper import Append, read_all, to_requests
from domain.projections import LLM
from storage.store import AppendRequest, MemoryEventStore
from wire.errors import ErrorCode, LamaError
from wire.identity import person_id_for
from wire.messages import ChatMessage, GenerationCompleted, Timing, Usage
from wire.params import GenerationParams, ModelParams

# ----------------------------------------------------------------------------- helpers shared by my test files


def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def write_gguf(path: Path, *, arch: str = "llama", name: str = "Tiny", context_length: int = 256,
               file_type: int = 15, salt: int = 0, n_floats: int = 32) -> Path:
    """A small valid GGUF v3 file: a few metadata keys and one F32 tensor (``salt`` varies its bytes)."""
    kv = [
        (_gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string(arch)),
        (_gguf_string("general.name") + struct.pack("<I", 8) + _gguf_string(name)),
        (_gguf_string(f"{arch}.context_length") + struct.pack("<I", 4) + struct.pack("<I", context_length)),
        (_gguf_string("general.file_type") + struct.pack("<I", 4) + struct.pack("<I", file_type)),
        (_gguf_string("lamabus.salt") + struct.pack("<I", 4) + struct.pack("<I", salt)),
    ]
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kv)) + b"".join(kv)
    tensor = _gguf_string("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 8, n_floats // 8)
    tensor += struct.pack("<I", 0) + struct.pack("<Q", 0)  # F32 at offset 0
    body = header + tensor
    body += b"\0" * ((-len(body)) % 32)
    body += struct.pack(f"<{n_floats}f", *[float(i + salt) for i in range(n_floats)])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


class Clock:
    """Epoch seconds that advance one millisecond per reading: distinct, deterministic event times."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


def chat(topic: str, mid: str, text: str = "hello", author: str = "user-1") -> ChatMessage:
    return ChatMessage(id=mid, topic=topic, author_id=author, text=text,
                       sent_at=datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc))


def reply_for(message: ChatMessage, model: LLM, text: str = "hi there") -> tuple[ChatMessage, GenerationCompleted]:
    reply = ChatMessage(id=f"r-{message.id}", topic=message.topic, author_id=model.person_id, text=text,
                        sent_at=datetime(2024, 5, 1, 12, 0, 1, tzinfo=timezone.utc), reply_to=message.id,
                        model_id=model.id)
    completed = GenerationCompleted(
        request_id=message.id, message_id=reply.id, topic=message.topic, author_id=model.person_id,
        model_id=model.id, text=text, thinking="", tokens=3, finish_reason="stop",
        timing=Timing(1.0, 2.0, 1.0, 3.0, 0.5), usage=Usage(5, 3, 8))
    return reply, completed


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    return d


@pytest.fixture
async def registry(tmp_path: Path, models_dir: Path):
    async with Registry.open(tmp_path / "registry.sqlite3", [models_dir], clock=Clock()) as reg:
        yield reg


# ----------------------------------------------------------------------------- import


async def test_import_records_gguf_metadata_and_checksum(registry: Registry, models_dir: Path):
    path = write_gguf(models_dir / "Tiny-Chat.Q4_K_M.gguf", context_length=512)
    calls: list[tuple[int, int | None, int]] = []
    m = await registry.import_model(path, "Tiny Chat", progress=lambda d, t: calls.append(
        (d, t, threading.get_ident())))
    assert m.id == "tiny-chat"
    assert m.person_id == person_id_for("tiny-chat")
    assert (m.architecture, m.context_length, m.quantization) == ("llama", 512, "Q4_K_M")
    assert m.size == path.stat().st_size and m.parameter_count == 32
    assert m.checksum == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m.model_path == str(path.resolve()) and m.filename == path.name
    assert (m.active, m.deleted, m.model_loaded, m.usage_count, m.version) == (False, False, False, 0, 1)
    assert m.created_at.endswith("Z") and m.created == m.modified
    # Hashing ran in a worker thread and reported the whole file.
    assert calls[-1][:2] == (m.size, m.size)
    assert all(ident != threading.get_ident() for _, _, ident in calls)


async def test_default_name_is_the_file_stem(registry: Registry, models_dir: Path):
    m = await registry.import_model(write_gguf(models_dir / "SmolThing-1B.Q4_1.gguf"))
    assert (m.name, m.id) == ("SmolThing-1B.Q4_1", "smolthing-1b-q4-1")


async def test_relative_path_is_taken_inside_the_model_dirs(registry: Registry, models_dir: Path):
    write_gguf(models_dir / "sub" / "a.gguf")
    m = await registry.import_model("sub/a.gguf")
    assert m.model_path == str((models_dir / "sub" / "a.gguf").resolve())


async def test_paths_outside_the_model_dirs_are_refused(registry: Registry, models_dir: Path, tmp_path: Path):
    outside = write_gguf(tmp_path / "elsewhere" / "x.gguf")
    (models_dir / "link.gguf").symlink_to(outside)
    (models_dir / "linkdir").symlink_to(outside.parent, target_is_directory=True)
    for path in (outside, models_dir / "link.gguf", models_dir / "linkdir" / "x.gguf", models_dir / ".." / "elsewhere"
                 / "x.gguf", "../elsewhere/x.gguf"):
        with pytest.raises(LamaError) as exc:
            await registry.import_model(path)
        assert exc.value.code is ErrorCode.BAD_REQUEST
        assert exc.value.details["allowed_dirs"] == [str(models_dir.resolve())]
        assert str(models_dir.resolve()) in exc.value.message
    assert await registry.list_models() == []


async def test_no_model_dirs_means_no_imports(tmp_path: Path):
    async with Registry(MemoryEventStore()) as reg:
        with pytest.raises(LamaError) as exc:
            await reg.import_model(write_gguf(tmp_path / "a.gguf"))
    assert exc.value.code is ErrorCode.BAD_REQUEST


async def test_missing_and_invalid_files(registry: Registry, models_dir: Path):
    with pytest.raises(LamaError) as exc:
        await registry.import_model(models_dir / "nope.gguf")
    assert exc.value.code is ErrorCode.MODEL_FILE_MISSING
    (models_dir / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(LamaError) as exc:
        await registry.import_model(models_dir / "bad.gguf")
    assert exc.value.code is ErrorCode.MODEL_INVALID
    assert await registry.store.last_position() == 0


async def test_same_file_twice_is_idempotent(registry: Registry, models_dir: Path):
    path = write_gguf(models_dir / "a.gguf")
    first = await registry.import_model(path, "Alpha")
    position = await registry.store.last_position()
    assert await registry.import_model(path, "Alpha") == first
    assert await registry.import_model(path) == first  # no name: whatever it is registered as
    assert await registry.store.last_position() == position
    with pytest.raises(LamaError) as exc:
        await registry.import_model(path, "Another Name")
    assert exc.value.code is ErrorCode.CONFLICT and exc.value.details["model_id"] == "alpha"
    other = write_gguf(models_dir / "b.gguf", salt=1)
    with pytest.raises(LamaError) as exc:
        await registry.import_model(other, "Alpha")
    assert exc.value.code is ErrorCode.CONFLICT
    assert await registry.store.last_position() == position


async def test_expected_sha256_mismatch_is_model_invalid(registry: Registry, models_dir: Path):
    path = write_gguf(models_dir / "a.gguf")
    with pytest.raises(LamaError) as exc:
        await registry.import_model(path, expected_sha256="0" * 64)
    assert exc.value.code is ErrorCode.MODEL_INVALID
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (await registry.import_model(path, expected_sha256=good.upper())).checksum == good


# ----------------------------------------------------------------------------- activate / params / remove


async def _two(registry: Registry, models_dir: Path) -> tuple[LLM, LLM]:
    a = await registry.import_model(write_gguf(models_dir / "a.gguf", salt=1), "A")
    b = await registry.import_model(write_gguf(models_dir / "b.gguf", salt=2), "B")
    return a, b


async def test_exactly_one_active_model_switched_in_one_transaction(registry: Registry, models_dir: Path):
    a, b = await _two(registry, models_dir)
    assert (await registry.activate("a")).active
    before = await registry.store.last_position()
    assert (await registry.activate("b")).active
    switch = await read_all(registry.store, before)
    assert [(e.stream_id, type(e.event)) for e in switch] == [("model-a", ModelDeactivated),
                                                               ("model-b", ModelActivated)]
    assert len({e.recorded_at for e in switch}) == 1 and switch[1].position == switch[0].position + 1
    models = {m.id: m.active for m in await registry.list_models()}
    assert models == {"a": False, "b": True}
    assert (await registry.active_model()).id == "b"
    position = await registry.store.last_position()
    await registry.activate("b")  # already active: nothing to record
    assert await registry.store.last_position() == position
    with pytest.raises(LamaError) as exc:
        await registry.activate("zzz")
    assert exc.value.code is ErrorCode.MODEL_NOT_FOUND


async def test_update_params_merges_and_checks_the_version(registry: Registry, models_dir: Path):
    a, _ = await _two(registry, models_dir)
    m = await registry.update_params("a", GenerationParams(temperature=0.2, stop=["END"]),
                                     ModelParams(context_size=1024, flash_attention="off"))
    assert (m.temperature, m.stop, m.context_size, m.max_tokens) == (0.2, ("END",), 1024, None)
    assert m.flash_attention == "off" and ModelConfig.resolve(m.model_path, m.model_params()).flash_attention == "off"
    m = await registry.update_params("a", GenerationParams(max_tokens=64), expected_version=m.version)
    assert (m.temperature, m.max_tokens) == (0.2, 64)
    assert m.generation_params() == GenerationParams(max_tokens=64, temperature=0.2, stop=["END"])
    assert ModelConfig.resolve(m.model_path, m.model_params()).n_ctx == 1024
    with pytest.raises(LamaError) as exc:
        await registry.update_params("a", GenerationParams(top_k=5), expected_version=m.version - 1)
    assert exc.value.code is ErrorCode.CONFLICT
    assert exc.value.details == {"stream_id": "model-a", "expected": m.version - 1, "actual": m.version}
    with pytest.raises(LamaError) as exc:
        await registry.update_params("a", GenerationParams())
    assert exc.value.code is ErrorCode.BAD_REQUEST
    m = await registry.update_params("a", GenerationParams(top_k=5), reset=True)
    assert (m.top_k, m.temperature, m.context_size) == (5, None, None)


async def test_remove_is_soft_and_deactivates(registry: Registry, models_dir: Path):
    a, b = await _two(registry, models_dir)
    await registry.activate("a")
    await registry.record_usage("a")
    removed = await registry.remove("a")
    assert (removed.deleted, removed.active) == (True, False)
    assert await registry.active_model() is None
    assert [m.id for m in await registry.list_models()] == ["b"]
    assert [m.id for m in await registry.list_models(include_deleted=True)] == ["a", "b"]
    assert (await registry.get_model("a")).deleted
    for command in (registry.activate("a"), registry.remove("a"), registry.update_params("a", GenerationParams(
            top_k=1))):
        with pytest.raises(LamaError) as exc:
            await command
        assert exc.value.code is ErrorCode.MODEL_NOT_FOUND
    # Importing the file again revives the same identity, with its usage history.
    revived = await registry.import_model(models_dir / "a.gguf", "A")
    assert (revived.deleted, revived.person_id, revived.usage_count, revived.created) == (
        False, a.person_id, 1, a.created)


async def test_record_usage(registry: Registry, models_dir: Path):
    await _two(registry, models_dir)
    await registry.record_usage("a")
    m = await registry.record_usage("a")
    assert m.usage_count == 2 and m.last_used is not None and m.last_used.endswith("Z")


async def test_llm_record_has_every_seed_field_in_camel_case(registry: Registry, models_dir: Path):
    a, _ = await _two(registry, models_dir)
    wire = msgspec.json.decode(msgspec.json.encode(a))
    seed_fields = {
        "name", "modelType", "filename", "personId", "deleted", "active", "creator", "created", "modified",
        "createdAt", "lastUsed", "usageCount", "size", "capabilities", "lastInitialized", "temperature",
        "batchSize", "threads", "maxTokens", "contextSize", "mirostat", "topK", "topP", "architecture",
        "contextLength", "quantization", "checksum", "provider", "modelLoaded", "modelPath",
    }
    assert seed_fields <= set(wire)
    assert wire["modelType"] == "local" and wire["capabilities"] == ["chat", "inference"]
    assert msgspec.json.decode(msgspec.json.encode(a), type=LLM) == a


# ----------------------------------------------------------------------------- bundled model


async def test_ensure_bundled_registers_once_and_activates(tmp_path: Path, models_dir: Path):
    bundled = write_gguf(tmp_path / "site-packages" / "SmolLM2-135M-Instruct.Q4_1.gguf", salt=7)
    db = tmp_path / "registry.sqlite3"
    async with Registry.open(db, [models_dir], clock=Clock()) as reg:
        m = await reg.ensure_bundled(bundled)  # outside the model dirs: the service vouches for it
        assert m is not None and (m.id, m.active, m.provider) == ("smollm2-135m-instruct", True, "bundled")
        assert m.name == BUNDLED_NAME
        position = await reg.store.last_position()
    async with Registry.open(db, [models_dir], clock=Clock()) as reg:
        again = await reg.ensure_bundled(bundled)
        assert again == m
        assert await reg.store.last_position() == position  # the second start appends nothing


async def test_ensure_bundled_leaves_an_active_model_and_a_removal_alone(registry: Registry, models_dir: Path,
                                                                         tmp_path: Path):
    a, _ = await _two(registry, models_dir)
    await registry.activate("a")
    bundled = write_gguf(tmp_path / "pkg" / "smol.gguf", salt=9)
    m = await registry.ensure_bundled(bundled)
    assert m is not None and not m.active and (await registry.active_model()).id == "a"
    await registry.remove(m.id)
    position = await registry.store.last_position()
    assert await registry.ensure_bundled(bundled) is None
    assert await registry.store.last_position() == position


async def test_ensure_bundled_follows_a_moved_file(registry: Registry, tmp_path: Path):
    old = write_gguf(tmp_path / "venv1" / "smol.gguf", salt=3)
    m = await registry.ensure_bundled(old)
    await registry.update_params(m.id, GenerationParams(temperature=0.1))
    new = write_gguf(tmp_path / "venv2" / "smol.gguf", salt=3)
    moved = await registry.ensure_bundled(new)
    assert moved is not None and moved.model_path == str(new.resolve())
    assert (moved.active, moved.temperature, moved.id) == (True, 0.1, m.id)


# ----------------------------------------------------------------------------- topics


async def test_topics_create_bind_and_resolve(registry: Registry, models_dir: Path):
    a, b = await _two(registry, models_dir)
    with pytest.raises(LamaError) as exc:
        await registry.model_for_topic("t1")
    assert exc.value.code is ErrorCode.MODEL_NOT_FOUND
    await registry.activate("a")
    t = await registry.create_topic("t1", name="General", created_by="user-1")
    assert (t.bound_model_id, t.model_id, t.person_id, t.name) == (None, "a", a.person_id, "General")
    with pytest.raises(LamaError) as exc:
        await registry.create_topic("t1")
    assert exc.value.code is ErrorCode.CONFLICT
    for bad in ("", "a.b", "x" * 129, "sp ace"):
        with pytest.raises(LamaError) as exc:
            await registry.create_topic(bad)
        assert exc.value.code is ErrorCode.BAD_REQUEST
    t = await registry.bind_topic("t1", "b")
    assert (t.bound_model_id, t.model_id, t.person_id) == ("b", "b", b.person_id)
    assert (await registry.model_for_topic("t1")).id == "b"
    assert (await registry.model_for_topic("t1", requested="a")).id == "a"
    assert (await registry.model_for_topic("other")).id == "a"  # unknown topics follow the active model
    await registry.remove("b")
    with pytest.raises(LamaError) as exc:
        await registry.model_for_topic("t1")
    assert exc.value.code is ErrorCode.MODEL_NOT_FOUND and exc.value.details["model_id"] == "b"
    t = await registry.bind_topic("t1", None)
    assert (t.bound_model_id, t.model_id) == (None, "a")
    t2 = await registry.bind_topic("t2", "a")  # binding creates the room
    assert t2.bound_model_id == "a"
    assert [t.id for t in await registry.list_topics()] == ["t1", "t2"]
    with pytest.raises(LamaError) as exc:
        await registry.get_topic("t3")
    assert exc.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(LamaError) as exc:
        await registry.bind_topic("t2", "b")
    assert exc.value.code is ErrorCode.MODEL_NOT_FOUND
    created = await registry.create_topic("t4", model_id="a")
    assert created.bound_model_id == "a"


async def test_reply_is_recorded_once_atomically(registry: Registry, models_dir: Path):
    a, _ = await _two(registry, models_dir)
    await registry.activate("a")
    msg = chat("room", "m1")
    reply, completed = reply_for(msg, a)
    before = await registry.store.last_position()
    assert await registry.record_reply(msg, reply, completed)
    written = await read_all(registry.store, before)
    assert [(e.stream_id, e.type) for e in written] == [
        ("topic-room", "topic.message_seen"), ("topic-room", "topic.reply_posted"), ("model-a", "model.used")]
    assert len({e.recorded_at for e in written}) == 1  # one transaction
    assert await registry.has_replied("room", "m1")
    # Redelivery: nothing new, usage counted once.
    assert not await registry.record_reply(msg, reply, completed)
    assert await registry.store.last_position() == written[-1].position
    assert (await registry.get_model("a")).usage_count == 1
    turns = await registry.history("room")
    assert [(t.message_id, t.is_ai, t.text) for t in turns] == [("m1", False, "hello"), ("r-m1", True, "hi there")]
    room = await registry.get_topic("room")
    assert (room.message_count, room.reply_count) == (1, 1)


async def test_directory_port(registry: Registry, models_dir: Path):
    a, _ = await _two(registry, models_dir)
    await registry.activate("a")
    await registry.update_params("a", GenerationParams(temperature=0.3), ModelParams(context_size=512))
    directory = RegistryDirectory(registry, history_turns=3)
    ref = await directory.resolve_model("room", None)
    assert (ref.model_id, ref.person_id, ref.config.n_ctx, ref.params) == (
        "a", a.person_id, 512, GenerationParams(temperature=0.3))
    assert directory.is_ai(a.person_id) and not directory.is_ai("user-1")
    msg = chat("room", "m1")
    assert await directory.recorded_reply("room", "m1") is None
    reply, completed = reply_for(msg, a)
    await directory.record_reply(msg, reply, completed)
    recorded = await directory.recorded_reply("room", "m1")
    assert recorded is not None and recorded.reply == reply and recorded.completed == completed
    cancelled = chat("room", "m2", text="never mind")
    await directory.record_unanswered(cancelled, "cancelled")
    recorded = await directory.recorded_reply("room", "m2")
    assert recorded is not None and recorded.reply is None and recorded.completed is None
    msg3 = chat("room", "m3", text="again")
    r3, c3 = reply_for(msg3, a, text="sure")
    await directory.record_reply(msg3, r3, c3)
    assert await directory.history("room") == [ChatTurn("assistant", "hi there"), ChatTurn("user", "again"),
                                               ChatTurn("assistant", "sure")]


async def test_runtime_facts_and_diagnostics(registry: Registry, models_dir: Path):
    await _two(registry, models_dir)
    await registry.record_loaded("a", "ctx-1", 256, 12.5)
    m = await registry.get_model("a")
    assert m.model_loaded and m.last_initialized > 0
    await registry.record_load_failed("b", LamaError(ErrorCode.OUT_OF_MEMORY, "too big"))
    assert (await registry.get_model("b")).last_error == "out_of_memory: too big"
    diag = await registry.diagnostics()
    assert (diag.models, diag.live_models, diag.loaded_models, diag.topics) == (2, 2, ["a"], 0)
    assert diag.position == await registry.store.last_position() == diag.events
    assert diag.db_path == str(registry.store.path) and diag.db_size_bytes and diag.db_size_bytes > 0
    await registry.record_unloaded("a", "idle")
    assert (await registry.diagnostics()).loaded_models == []


class _RacingStore(MemoryEventStore):
    """Lets a competing writer commit right before our first append, like another process would."""

    def __init__(self) -> None:
        super().__init__()
        self.race: list[AppendRequest] = []

    async def append_batch(self, requests):
        if self.race:
            competing, self.race = self.race, []
            await super().append_batch(competing)
        return await super().append_batch(requests)


async def test_concurrent_activation_is_retried_and_stays_exclusive(tmp_path: Path, models_dir: Path):
    store = _RacingStore()
    async with Registry(store, [models_dir], clock=Clock()) as reg:
        await _two(reg, models_dir)
        c = await reg.import_model(write_gguf(models_dir / "c.gguf", salt=3), "C")
        await reg.activate("a")
        # Another writer activates C (deactivating A) just before our switch to B lands.
        store.race = to_requests([Append("model-a", [ModelDeactivated(at=1)], 2),
                                  Append("model-c", [ModelActivated(at=1)], c.version)])
        await reg.activate("b")
        active = [m.id for m in await reg.list_models() if m.active]
        assert active == ["b"]
        # The retry saw C active and deactivated it in the same append.
        tail = await read_all(store, await store.last_position() - 2)
        assert [(e.stream_id, e.type) for e in tail] == [("model-c", "model.deactivated"),
                                                          ("model-b", "model.activated")]


async def test_two_registries_on_one_file_see_each_other(tmp_path: Path, models_dir: Path):
    db = tmp_path / "r.sqlite3"
    async with Registry.open(db, [models_dir], clock=Clock()) as one, \
            Registry.open(db, [models_dir], clock=Clock()) as two:
        await one.import_model(write_gguf(models_dir / "a.gguf"), "A")
        assert [m.id for m in await two.list_models()] == ["a"]
        await two.activate("a")
        assert (await one.active_model()).id == "a"


def test_helpers_write_what_the_reader_reads(tmp_path: Path):
    from engine.gguf import read_model_info

    info = read_model_info(write_gguf(tmp_path / "x.gguf", arch="qwen2", context_length=4096, file_type=3))
    assert (info.architecture, info.context_length, info.quantization, info.parameter_count) == (
        "qwen2", 4096, "Q4_1", 32)
    assert os.path.getsize(tmp_path / "x.gguf") == info.size


async def test_system_prompt_topic_over_model_over_default(tmp_path, model_path):
    from handlers.directory import RegistryDirectory
    from handlers.registry import Registry

    async with Registry.open(tmp_path / "r.sqlite3", [model_path.parent]) as reg:
        model = await reg.ensure_bundled(model_path)
        directory = RegistryDirectory(reg)
        assert (await directory.resolve_model("t1", None)).system_prompt is None
        await reg.set_model_system_prompt(model.id, "Be brief.")
        assert (await directory.resolve_model("t1", None)).system_prompt == "Be brief."
        info = await reg.set_topic_system_prompt("t1", "Answer in French.")
        assert info.system_prompt == "Answer in French."
        assert (await directory.resolve_model("t1", None)).system_prompt == "Answer in French."
        assert (await directory.resolve_model("t2", None)).system_prompt == "Be brief."
        created = await reg.create_topic("t3", system_prompt="Rhyme.")
        assert created.system_prompt == "Rhyme."
    async with Registry.open(tmp_path / "r.sqlite3", [model_path.parent]) as reg:  # replayed from the log
        assert reg.view.topics["t1"].system_prompt == "Answer in French."
        assert reg.view.models[model.id].system_prompt == "Be brief."


async def test_update_model_changes_parameters_and_prompt_in_one_atomic_append(registry: Registry, models_dir: Path):
    a, _ = await _two(registry, models_dir)
    before = await registry.store.last_position()
    m = await registry.update_model("a", generation=GenerationParams(temperature=0.2), system_prompt="Be terse.",
                                    expected_version=a.version)
    appended = await read_all(registry.store, before)
    assert [(e.stream_id, e.version) for e in appended] == [("model-a", a.version + 1), ("model-a", a.version + 2)]
    assert {e.position for e in appended} == {before + 1, before + 2}
    assert (m.temperature, m.system_prompt, m.version) == (0.2, "Be terse.", a.version + 2)
    # The version check covers a prompt-only change too, and a stale one writes nothing.
    with pytest.raises(LamaError) as exc:
        await registry.update_model("a", system_prompt=None, expected_version=a.version)
    assert exc.value.code is ErrorCode.CONFLICT
    assert await registry.store.last_position() == before + 2
    with pytest.raises(LamaError) as exc:
        await registry.update_model("a")
    assert exc.value.code is ErrorCode.BAD_REQUEST


async def test_topic_analysis_is_recorded_fenced_and_replayed(tmp_path: Path, models_dir: Path):
    from handlers.analysis_store import RegistryAnalysisStore
    from wire.records import TopicAnalysis

    def analysis(replies: int, based_on: str) -> TopicAnalysis:
        return TopicAnalysis(title="Greetings", keywords=("hello", "hi", "greeting"), summary="They greet.",
                             language="en", based_on_message_id=based_on, model_id="a", reply_count=replies,
                             analysed_at=0)

    path = tmp_path / "r.sqlite3"
    async with Registry.open(path, [models_dir], clock=Clock()) as reg:
        a, _ = await _two(reg, models_dir)
        await reg.activate("a")
        store = RegistryAnalysisStore(reg)
        assert store.topic_state("room") is None
        msg = chat("room", "m1")
        reply, completed = reply_for(msg, a)
        await reg.record_reply(msg, reply, completed)
        state = store.topic_state("room")
        assert state is not None and (state.reply_count, state.last_reply_id, state.analysed_reply_count,
                                      state.enabled) == (1, "r-m1", None, True)
        before = await reg.store.last_position()
        recorded = await reg.record_analysis("room", analysis(1, "r-m1"))
        assert recorded is not None and recorded.title == "Greetings" and recorded.based_on_message_id == "r-m1"
        assert recorded.analysed_at > 0  # the registry's clock, not the analyser's
        written = await read_all(reg.store, before)
        assert [(e.stream_id, e.type) for e in written] == [("topic-room", "topic.analysed")]
        info = await reg.get_topic("room")
        assert info.analysis == recorded and info.analysis_enabled
        assert info.modified == (await reg.get_topic("room")).modified
        assert store.topic_state("room").analysed_reply_count == 1
        # The same one again, or an older one (another node, late): nothing is stored.
        assert await reg.record_analysis("room", analysis(1, "r-m1")) is None
        assert await reg.record_analysis("room", analysis(0, "r-m0")) is None
        assert await reg.store.last_position() == written[-1].position
        # Switched off: the switch is recorded, and an analysis that was under way is dropped.
        off = await reg.set_topic_analysis("room", False)
        assert not off.analysis_enabled and off.analysis == recorded
        assert await reg.record_analysis("room", analysis(5, "r-m5")) is None
        assert not store.topic_state("room").enabled
        kept = reg.view.state()
    async with Registry.open(path, [models_dir]) as reg:  # replayed from the log
        assert reg.view.state() == kept
        assert (await reg.get_topic("room")).analysis == recorded
    with pytest.raises(LamaError) as exc:
        async with Registry.open(path, [models_dir]) as reg:
            await reg.record_analysis("nowhere", analysis(1, "x"))
    assert exc.value.code is ErrorCode.NOT_FOUND
