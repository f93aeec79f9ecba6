"""Registry commands and queries: the seed's LLMManager over the event store.

Every command reads the projections, decides which events follow, and appends
them with the stream versions it decided on. A concurrent writer (another
process on the same file) makes the append fail with ``conflict``; commands
whose caller gave no explicit ``expected_version`` then re-read and decide
again, a few times, before giving up with that conflict.

Decisions worth knowing:

* Import only from the configured model directories (after resolving
  symlinks), except ``ensure_bundled``, whose path the service itself supplies.
* Importing a file whose checksum is already registered under the same id (or
  with no name given) is idempotent: the existing record comes back and
  nothing is appended. The same file under another explicit name, or another
  file under a taken id, is a ``conflict``. A removed model's id can be
  imported again: the record comes back (same person id, usage kept).
* Exactly one model is active: activating B appends "deactivated" to the
  old one and "activated" to B in one transaction.
* Removing is a soft delete; removing the active model deactivates it in the
  same append.
* A topic's user message and the AI's reply (plus the model's usage) are
  recorded in one atomic append, with event ids derived from the topic and
  message id: a redelivered message can never be recorded, nor answered, twice.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import msgspec
from msgspec import UNSET, UnsetType

from engine.gguf import ModelInfo, read_model_info
from handlers.model_files import ProgressCallback, hash_file, run_in_thread
from storage.events import (
    DomainEvent,
    ModelActivated,
    ModelDeactivated,
    ModelImported,
    ModelLoaded,
    ModelLoadFailed,
    ModelParametersChanged,
    ModelRemoved,
    ModelSystemPromptSet,
    ModelUnloaded,
    ModelUsed,
    TopicCreated,
    TopicMessageSeen,
    TopicModelBound,
    TopicReplyPosted,
    TopicSystemPromptSet,
    model_stream,
    topic_stream,
)
from storage.projections import DEFAULT_HISTORY_TURNS, LLM, Projections, TopicRoom, Turn
from storage.sqlite import SqliteEventStore
from storage.store import ANY, NO_STREAM, AppendRequest, EventStore, NewEvent
from storage.store import conflict as store_conflict
from wire.api import RegistryDiagnostics
from wire.errors import ErrorCode, LamaError
from wire.identity import slugify
from wire.messages import ChatMessage, GenerationCompleted, valid_topic_id
from wire.params import GenerationParams, ModelParams
from wire.records import TopicInfo

BUNDLED_NAME = "SmolLM2 135M Instruct"
_MAX_NAME = 200
_RETRIES = 4


def _model_not_found(model_id: str, why: str = "") -> LamaError:
    return LamaError(ErrorCode.MODEL_NOT_FOUND, f"model {model_id!r} not found{why}", model_id=model_id)


def has_values(params: msgspec.Struct | None) -> bool:
    return params is not None and any(getattr(params, f) is not None for f in params.__struct_fields__)


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


class Registry:
    """Models and topics, event-sourced. Use as an async context manager.

    ``model_dirs``: the only directories ``import_model`` reads from.
    ``clock``: epoch seconds, injectable so tests get deterministic event times.
    """

    def __init__(self, store: EventStore, model_dirs: Sequence[str | os.PathLike[str]] = (), *,
                 clock: Callable[[], float] = time.time, creator: str = "lamabus",
                 owns_store: bool = False, history_turns: int = DEFAULT_HISTORY_TURNS) -> None:
        self.store = store
        self.model_dirs = [Path(d).expanduser().resolve() for d in model_dirs]
        self.clock = clock
        self.creator = creator
        self.view = Projections(history_turns)
        self._owns_store = owns_store
        self._lock = anyio.Lock()

    @classmethod
    def open(cls, db_path: str | os.PathLike[str], model_dirs: Sequence[str | os.PathLike[str]] = (),
             **kwargs: Any) -> "Registry":
        """A registry on its own SQLite file, closed with the registry."""
        return cls(SqliteEventStore(db_path), model_dirs, owns_store=True, **kwargs)

    async def __aenter__(self) -> "Registry":
        await self.store.open()
        await self.refresh()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_store:
            await self.store.close()

    # ------------------------------------------------------------------ plumbing

    def _now(self) -> int:
        return int(self.clock() * 1000)

    async def refresh(self) -> int:
        """Apply whatever was committed since we last looked (ours or another process's)."""
        async with self._lock:
            return await self._catch_up()

    async def _catch_up(self) -> int:
        async for stored in self.store.iter_all(self.view.position):
            self.view.apply(stored)
        return self.view.position

    async def _execute(self, decide: Callable[[Projections], Sequence[AppendRequest] | None], *,
                       retry: bool = True) -> bool:
        """Decide on the current view and append; on a concurrent change, look again and re-decide.

        Returns whether anything new was stored.
        """
        async with self._lock:
            for attempt in range(_RETRIES):
                await self._catch_up()
                requests = decide(self.view)
                if not requests:
                    return False
                try:
                    results = await self.store.append_batch(requests)
                except LamaError as exc:
                    if exc.code is not ErrorCode.CONFLICT or not retry or attempt == _RETRIES - 1:
                        raise
                    continue
                await self._catch_up()
                return not all(r.duplicate for r in results)
        raise AssertionError("unreachable")  # pragma: no cover

    def _live(self, view: Projections, model_id: str) -> LLM:
        m = view.models.get(model_id)
        if m is None:
            raise _model_not_found(model_id)
        if m.deleted:
            raise _model_not_found(model_id, " (it was removed)")
        return m

    # ------------------------------------------------------------------ import

    def resolve_import_path(self, path: str | os.PathLike[str]) -> Path:
        """The real path of ``path`` if it lies inside a model directory, else ``bad_request``.

        Relative paths are taken relative to the model directories (first match).
        Symlinks are resolved first, so a link inside a model directory pointing
        outside it is refused.
        """
        dirs = [str(d) for d in self.model_dirs]
        if not self.model_dirs:
            raise LamaError(ErrorCode.BAD_REQUEST,
                            "importing models is disabled: no model directories are configured",
                            path=str(path), allowed_dirs=dirs)
        p = Path(path).expanduser()
        candidates = [p] if p.is_absolute() else [d / p for d in self.model_dirs]
        inside = [r for r in (c.resolve() for c in candidates) if any(r.is_relative_to(d) for d in self.model_dirs)]
        # Prefer a file that exists; else the first allowed spelling, so the error says "missing".
        for resolved in inside:
            if resolved.exists():
                return resolved
        if inside:
            return inside[0]
        raise LamaError(
            ErrorCode.BAD_REQUEST,
            f"{path} is outside the model directories ({', '.join(dirs)}); copy or pull the model there first",
            path=str(path), allowed_dirs=dirs,
        )

    async def import_model(self, path: str | os.PathLike[str], name: str | None = None, *,
                           generation: GenerationParams | None = None, load: ModelParams | None = None,
                           provider: str = "local", progress: ProgressCallback | None = None,
                           expected_sha256: str | None = None) -> LLM:
        """Register a GGUF file from a model directory. See the module docstring for repeats.

        ``expected_sha256``: refuse (``model_invalid``) a file whose hash differs.
        """
        resolved = self.resolve_import_path(path)
        return await self._import(resolved, name, generation=generation, load=load, provider=provider,
                                  progress=progress, expected_sha256=expected_sha256)

    async def _import(self, resolved: Path, name: str | None, *, generation: GenerationParams | None,
                      load: ModelParams | None, provider: str, progress: ProgressCallback | None,
                      expected_sha256: str | None = None, checksum: str | None = None,
                      revive_removed: bool = True) -> LLM:
        info: ModelInfo = await run_in_thread(read_model_info, resolved)
        display = (name or resolved.stem).strip()
        if not display or len(display) > _MAX_NAME:
            raise LamaError(ErrorCode.BAD_REQUEST, f"model name must be 1..{_MAX_NAME} characters", name=name)
        model_id = slugify(display)
        if checksum is None:
            checksum = await hash_file(resolved, progress)
        if expected_sha256 is not None and checksum != expected_sha256.lower():
            raise LamaError(ErrorCode.MODEL_INVALID,
                            f"{resolved.name}: SHA-256 {checksum} does not match the expected {expected_sha256}",
                            path=str(resolved), sha256=checksum, expected_sha256=expected_sha256)
        event = ModelImported(
            at=self._now(), name=display, filename=resolved.name, model_path=str(resolved), size=info.size,
            checksum=checksum, architecture=info.architecture, parameter_count=info.parameter_count,
            context_length=info.context_length, quantization=info.quantization, provider=provider,
            creator=self.creator, generation=generation if has_values(generation) else None,
            load=load if has_values(load) else None,
        )

        def decide(view: Projections) -> list[AppendRequest] | None:
            same_file = next((m for m in view.live_models() if m.checksum == checksum), None)
            if same_file is not None:
                if name is None or same_file.id == model_id:
                    return None  # idempotent: this file is registered already
                raise LamaError(ErrorCode.CONFLICT,
                                f"{resolved.name} is already registered as {same_file.id!r}",
                                model_id=same_file.id, checksum=checksum)
            existing = view.models.get(model_id)
            if existing is not None and not existing.deleted:
                raise LamaError(ErrorCode.CONFLICT,
                                f"model id {model_id!r} is taken by another file ({existing.filename}); "
                                "choose another name", model_id=model_id)
            if existing is not None and not revive_removed:
                return None
            expected = existing.version if existing is not None else NO_STREAM
            return [AppendRequest(model_stream(model_id), [event], expected)]

        await self._execute(decide)
        same = next((m for m in self.view.live_models() if m.checksum == checksum), None)
        if same is None:
            raise _model_not_found(model_id, " (it was removed while importing)")
        return same

    async def ensure_bundled(self, path: str | os.PathLike[str], name: str = BUNDLED_NAME) -> LLM | None:
        """Register the bundled model on first start and activate it if nothing is active.

        Idempotent across restarts: when the model is registered at this path and
        a model is active, nothing is read, hashed or appended. A bundled model
        the user removed stays removed (returns None). If the file moved (a new
        virtualenv), it is re-registered at the new path with its parameters kept.
        """
        resolved = Path(path).expanduser().resolve()
        model_id = slugify(name)
        await self.refresh()
        existing = self.view.models.get(model_id)
        if existing is not None and existing.deleted:
            return None
        if existing is None or existing.model_path != str(resolved):
            keep_gen = existing.generation_params() if existing else None
            keep_load = existing.model_params() if existing else None
            if existing is not None:
                # Same id, new path: re-register in place rather than under a second id.
                await self._reimport(existing, resolved, keep_gen, keep_load)
            else:
                try:
                    model_id = (await self._import(resolved, name, generation=None, load=None, provider="bundled",
                                                   progress=None, revive_removed=False)).id
                except LamaError as exc:
                    if exc.code is not ErrorCode.CONFLICT or "checksum" not in exc.details:
                        raise
                    model_id = exc.details["model_id"]  # the user imported this very file under another name
        model = self.view.models.get(model_id)
        if model is None or model.deleted:
            return None
        if self.view.active_model_id is None:
            model = await self.activate(model_id)
        return model

    async def _reimport(self, existing: LLM, resolved: Path, generation: GenerationParams | None,
                        load: ModelParams | None) -> None:
        info: ModelInfo = await run_in_thread(read_model_info, resolved)
        checksum = await hash_file(resolved)
        event = ModelImported(
            at=self._now(), name=existing.name, filename=resolved.name, model_path=str(resolved), size=info.size,
            checksum=checksum, architecture=info.architecture, parameter_count=info.parameter_count,
            context_length=info.context_length, quantization=info.quantization, provider=existing.provider,
            creator=existing.creator, generation=generation if has_values(generation) else None,
            load=load if has_values(load) else None,
        )

        def decide(view: Projections) -> list[AppendRequest] | None:
            current = self._live(view, existing.id)
            if current.model_path == str(resolved):
                return None
            return [AppendRequest(model_stream(existing.id), [event], current.version)]

        await self._execute(decide)

    # ------------------------------------------------------------------ model commands

    async def update_params(self, model_id: str, generation: GenerationParams | None = None,
                            load: ModelParams | None = None, *, reset: bool = False,
                            expected_version: int | None = None) -> LLM:
        """Lay overrides over the model's stored parameters (``reset``: replace them all).

        ``expected_version``: the ``version`` the caller saw; ``conflict`` if it moved on.
        """
        if not reset and not has_values(generation) and not has_values(load):
            raise LamaError(ErrorCode.BAD_REQUEST, "no parameters to change", model_id=model_id)

        def decide(view: Projections) -> list[AppendRequest]:
            m = self._live(view, model_id)
            ev = ModelParametersChanged(at=self._now(), generation=generation if has_values(generation) else None,
                                        load=load if has_values(load) else None, reset=reset)
            expected = m.version if expected_version is None else expected_version
            return [AppendRequest(model_stream(model_id), [ev], expected)]

        await self._execute(decide, retry=expected_version is None)
        return self.view.models[model_id]

    async def update_model(self, model_id: str, *, generation: GenerationParams | None = None,
                           load: ModelParams | None = None, reset: bool = False,
                           system_prompt: str | None | UnsetType = UNSET,
                           expected_version: int | None = None) -> LLM:
        """``models.update``: parameters and/or the system prompt, in one atomic append.

        ``system_prompt`` UNSET leaves it; None clears it (the service default). ``expected_version``:
        the ``version`` the caller saw; ``conflict`` if it moved on (also when only the prompt changes).
        """
        change_params = reset or has_values(generation) or has_values(load)
        if not change_params and system_prompt is UNSET:
            raise LamaError(ErrorCode.BAD_REQUEST, "nothing to change: give generation, load, reset or systemPrompt",
                            model_id=model_id, field="$.generation")

        def decide(view: Projections) -> list[AppendRequest] | None:
            m = self._live(view, model_id)
            at = self._now()
            events: list[DomainEvent] = []
            if change_params:
                events.append(ModelParametersChanged(at=at, generation=generation if has_values(generation) else None,
                                                     load=load if has_values(load) else None, reset=reset))
            if system_prompt is not UNSET and system_prompt != m.system_prompt:
                events.append(ModelSystemPromptSet(at=at, system_prompt=system_prompt))
            expected = m.version if expected_version is None else expected_version
            if not events:
                if expected != m.version:
                    raise store_conflict(model_stream(model_id), expected, m.version)
                return None
            return [AppendRequest(model_stream(model_id), events, expected)]

        await self._execute(decide, retry=expected_version is None)
        return self.view.models[model_id]

    async def set_model_system_prompt(self, model_id: str, system_prompt: str | None) -> LLM:
        """The system prompt this model's conversations start with (None: the service default)."""

        def decide(view: Projections) -> list[AppendRequest] | None:
            m = self._live(view, model_id)
            if m.system_prompt == system_prompt:
                return None
            return [AppendRequest(model_stream(model_id), [ModelSystemPromptSet(at=self._now(),
                                                                               system_prompt=system_prompt)], m.version)]

        await self._execute(decide)
        return self.view.models[model_id]

    async def activate(self, model_id: str) -> LLM:
        def decide(view: Projections) -> list[AppendRequest] | None:
            m = self._live(view, model_id)
            if view.active_model_id == model_id:
                return None
            at = self._now()
            requests = []
            previous = view.active_model()
            if previous is not None:
                requests.append(AppendRequest(model_stream(previous.id), [ModelDeactivated(at=at, reason="replaced")],
                                              previous.version))
            requests.append(AppendRequest(model_stream(model_id), [ModelActivated(at=at)], m.version))
            return requests

        await self._execute(decide)
        return self.view.models[model_id]

    async def deactivate(self, model_id: str) -> LLM:
        def decide(view: Projections) -> list[AppendRequest] | None:
            m = self._live(view, model_id)
            if not m.active:
                return None
            return [AppendRequest(model_stream(model_id), [ModelDeactivated(at=self._now(), reason="requested")],
                                  m.version)]

        await self._execute(decide)
        return self.view.models[model_id]

    async def remove(self, model_id: str) -> LLM:
        """Soft delete. The record stays (``deleted``), so its identity and history do too.

        A loaded model should be unloaded first (``ModelsRuntime.remove`` does both).
        """
        def decide(view: Projections) -> list[AppendRequest]:
            m = self._live(view, model_id)
            at = self._now()
            events: list[DomainEvent] = []
            if m.active:
                events.append(ModelDeactivated(at=at, reason="removed"))
            events.append(ModelRemoved(at=at))
            return [AppendRequest(model_stream(model_id), events, m.version)]

        await self._execute(decide)
        return self.view.models[model_id]

    async def record_usage(self, model_id: str) -> LLM:
        def decide(view: Projections) -> list[AppendRequest]:
            self._live(view, model_id)
            return [AppendRequest(model_stream(model_id), [ModelUsed(at=self._now())], ANY)]

        await self._execute(decide)
        return self.view.models[model_id]

    async def record_loaded(self, model_id: str, handle: str, n_ctx: int, load_ms: float = 0.0) -> None:
        await self._record_runtime(model_id, ModelLoaded(at=self._now(), handle=handle, n_ctx=n_ctx,
                                                         load_ms=round(load_ms, 3)))

    async def record_unloaded(self, model_id: str, reason: str = "requested") -> None:
        await self._record_runtime(model_id, ModelUnloaded(at=self._now(), reason=reason))  # type: ignore[arg-type]

    async def record_load_failed(self, model_id: str, error: LamaError) -> None:
        await self._record_runtime(model_id, ModelLoadFailed(at=self._now(), code=error.code.value,
                                                             message=error.message))

    async def _record_runtime(self, model_id: str, event: DomainEvent) -> None:
        # Facts about this process's engine: recorded even for a model removed meanwhile.
        def decide(view: Projections) -> list[AppendRequest]:
            if model_id not in view.models:
                raise _model_not_found(model_id)
            return [AppendRequest(model_stream(model_id), [event], ANY)]

        await self._execute(decide)

    # ------------------------------------------------------------------ topics

    @staticmethod
    def _check_topic(topic_id: str) -> None:
        if not isinstance(topic_id, str) or not valid_topic_id(topic_id):
            raise LamaError(ErrorCode.BAD_REQUEST,
                            f"invalid topic id {topic_id!r}: use 1-128 characters of A-Z a-z 0-9 _ -",
                            topic=topic_id)

    def topic_info(self, room: TopicRoom) -> TopicInfo:
        model_id = room.model_id or self.view.active_model_id
        model = self.view.models.get(model_id) if model_id else None
        return TopicInfo(
            id=room.id, name=room.name, bound_model_id=room.model_id, model_id=model_id,
            person_id=model.person_id if model else None, created_by=room.created_by, created=room.created,
            modified=room.modified, message_count=room.message_count, reply_count=room.reply_count,
            version=room.version, system_prompt=room.system_prompt,
        )

    async def create_topic(self, topic_id: str, name: str | None = None, model_id: str | None = None,
                           created_by: str | None = None, system_prompt: str | None = None) -> TopicInfo:
        """A new topic room, optionally bound to a model; ``conflict`` if it exists."""
        self._check_topic(topic_id)

        def decide(view: Projections) -> list[AppendRequest]:
            if topic_id in view.topics:
                raise LamaError(ErrorCode.CONFLICT, f"topic {topic_id!r} exists", topic=topic_id)
            at = self._now()
            events: list[DomainEvent] = [TopicCreated(at=at, name=name, created_by=created_by)]
            if model_id is not None:
                self._live(view, model_id)
                events.append(TopicModelBound(at=at, model_id=model_id))
            if system_prompt is not None:
                events.append(TopicSystemPromptSet(at=at, system_prompt=system_prompt))
            return [AppendRequest(topic_stream(topic_id), events, NO_STREAM)]

        await self._execute(decide)
        return self.topic_info(self.view.topics[topic_id])

    async def ensure_topic(self, topic_id: str, created_by: str | None = None) -> TopicInfo:
        self._check_topic(topic_id)

        def decide(view: Projections) -> list[AppendRequest] | None:
            if topic_id in view.topics:
                return None
            return [AppendRequest(topic_stream(topic_id), [TopicCreated(at=self._now(), created_by=created_by)],
                                  NO_STREAM)]

        await self._execute(decide)
        return self.topic_info(self.view.topics[topic_id])

    async def set_topic_system_prompt(self, topic_id: str, system_prompt: str | None) -> TopicInfo:
        """The topic's own system prompt, over its model's (creating the room if needed)."""
        self._check_topic(topic_id)

        def decide(view: Projections) -> list[AppendRequest] | None:
            room = view.topics.get(topic_id)
            at = self._now()
            event = TopicSystemPromptSet(at=at, system_prompt=system_prompt)
            if room is None:
                return [AppendRequest(topic_stream(topic_id), [TopicCreated(at=at), event], NO_STREAM)]
            if room.system_prompt == system_prompt:
                return None
            return [AppendRequest(topic_stream(topic_id), [event], room.version)]

        await self._execute(decide)
        return self.topic_info(self.view.topics[topic_id])

    async def bind_topic(self, topic_id: str, model_id: str | None) -> TopicInfo:
        """Bind a topic to a model (creating the room if needed); ``None`` follows the active model again."""
        self._check_topic(topic_id)

        def decide(view: Projections) -> list[AppendRequest] | None:
            if model_id is not None:
                self._live(view, model_id)
            room = view.topics.get(topic_id)
            at = self._now()
            if room is None:
                return [AppendRequest(topic_stream(topic_id),
                                      [TopicCreated(at=at), TopicModelBound(at=at, model_id=model_id)], NO_STREAM)]
            if room.model_id == model_id:
                return None
            return [AppendRequest(topic_stream(topic_id), [TopicModelBound(at=at, model_id=model_id)], room.version)]

        await self._execute(decide)
        return self.topic_info(self.view.topics[topic_id])

    async def record_message(self, message: ChatMessage, *, unanswered: str | None = None) -> bool:
        """Record a user message as seen (``unanswered``: settled without a reply). False if it was already."""
        self._check_topic(message.topic)
        seen = NewEvent(self._seen_event(message, unanswered), f"{message.topic}/{message.id}/seen")

        def decide(view: Projections) -> list[AppendRequest] | None:
            if view.has_seen(message.topic, message.id):
                return None
            return [AppendRequest(topic_stream(message.topic), [seen], ANY)]

        return await self._execute(decide)

    async def record_reply(self, message: ChatMessage, reply: ChatMessage, completed: GenerationCompleted) -> bool:
        """Record the user message, the AI's reply and the model's use in ONE atomic append.

        Event ids are derived from (topic, message id), so a retry after a crash or a
        redelivery stores nothing twice. Returns False when the reply was already recorded.
        """
        topic = message.topic
        self._check_topic(topic)
        key = f"{topic}/{message.id}"
        at = self._now()
        seen = NewEvent(self._seen_event(message, None, at), f"{key}/seen")
        posted = NewEvent(TopicReplyPosted(
            at=at, message_id=reply.id, reply_to=message.id, model_id=completed.model_id, author_id=reply.author_id,
            text=reply.text, sent_at=_iso(reply.sent_at), thinking=completed.thinking, tokens=completed.tokens,
            finish_reason=completed.finish_reason, usage=completed.usage, timing=completed.timing,
        ), f"{key}/reply")
        used = NewEvent(ModelUsed(at=at), f"{key}/used")

        def decide(view: Projections) -> list[AppendRequest] | None:
            if view.has_replied(topic, message.id):
                return None
            events = [posted] if view.has_seen(topic, message.id) else [seen, posted]
            requests = [AppendRequest(topic_stream(topic), events, ANY)]
            if completed.model_id in view.models:
                requests.append(AppendRequest(model_stream(completed.model_id), [used], ANY))
            return requests

        return await self._execute(decide)

    def _seen_event(self, message: ChatMessage, unanswered: str | None, at: int | None = None) -> TopicMessageSeen:
        return TopicMessageSeen(at=self._now() if at is None else at, message_id=message.id,
                                author_id=message.author_id, text=message.text, sent_at=_iso(message.sent_at),
                                unanswered=unanswered)

    # ------------------------------------------------------------------ queries

    async def list_models(self, include_deleted: bool = False) -> list[LLM]:
        await self.refresh()
        models = self.view.models.values() if include_deleted else self.view.live_models()
        return sorted(models, key=lambda m: (m.created, m.id))

    async def get_model(self, model_id: str, include_deleted: bool = True) -> LLM:
        await self.refresh()
        m = self.view.models.get(model_id)
        if m is None or (m.deleted and not include_deleted):
            raise _model_not_found(model_id)
        return m

    async def active_model(self) -> LLM | None:
        await self.refresh()
        return self.view.active_model()

    async def list_topics(self) -> list[TopicInfo]:
        await self.refresh()
        return [self.topic_info(r) for r in sorted(self.view.topics.values(), key=lambda r: (r.created, r.id))]

    async def get_topic(self, topic_id: str) -> TopicInfo:
        self._check_topic(topic_id)
        await self.refresh()
        room = self.view.topics.get(topic_id)
        if room is None:
            raise LamaError(ErrorCode.NOT_FOUND, f"topic {topic_id!r} not found", topic=topic_id)
        return self.topic_info(room)

    async def model_for_topic(self, topic_id: str, requested: str | None = None, *, refresh: bool = True) -> LLM:
        """Who answers in ``topic_id``: the requested model, else the topic's, else the active one.

        ``refresh=False`` answers from the view as it stands (see :class:`RegistryDirectory`).
        """
        if refresh:
            await self.refresh()
        view = self.view
        if requested is not None:
            return self._live(view, requested)
        room = view.topics.get(topic_id)
        if room is not None and room.model_id is not None:
            m = view.models.get(room.model_id)
            if m is None or m.deleted:
                raise _model_not_found(room.model_id, f" (topic {topic_id!r} is bound to it; bind another model)")
            return m
        active = view.active_model()
        if active is None:
            raise LamaError(ErrorCode.MODEL_NOT_FOUND, "no active model: import or pull one and activate it",
                            topic=topic_id)
        return active

    async def has_replied(self, topic_id: str, message_id: str) -> bool:
        await self.refresh()
        return self.view.has_replied(topic_id, message_id)

    async def history(self, topic_id: str, limit: int | None = None, *, refresh: bool = True) -> list[Turn]:
        if refresh:
            await self.refresh()
        return self.view.conversation(topic_id, limit)

    def is_ai(self, author_id: str) -> bool:
        return author_id in self.view.ai_person_ids

    async def diagnostics(self, loaded: Sequence[str] | None = None) -> RegistryDiagnostics:
        """Counts and where the data lives. ``loaded``: what the runtime holds (default: what the log says)."""
        await self.refresh()
        view = self.view
        path = getattr(self.store, "path", None)
        size = self.store.file_size() if isinstance(self.store, SqliteEventStore) else None
        if loaded is None:
            loaded = [m.id for m in view.models.values() if m.model_loaded]
        return RegistryDiagnostics(
            models=len(view.models), live_models=len(view.live_models()), active_model_id=view.active_model_id,
            loaded_models=sorted(loaded), topics=len(view.topics), events=view.event_count,
            position=view.position, db_path=str(path) if path is not None else None, db_size_bytes=size,
            model_dirs=[str(d) for d in self.model_dirs],
        )
