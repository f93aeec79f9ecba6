"""The registry's application service: the seed's LLMManager over the event store.

Every command reads the projections, asks ``domain.decisions`` which events
follow, and appends them with the stream versions the decision named. A
concurrent writer (another process on the same file, another node on the
cluster) makes the append fail with ``conflict``; commands whose caller gave
no explicit ``expected_version`` then re-read and decide again, a few times,
before giving up with that conflict. The rules themselves (idempotent import,
one active model, soft delete, exactly-once reply records) are documented in
``domain.decisions``.

What lives here rather than in the domain: the clock, reading and hashing
model files (import only from the configured model directories, after
resolving symlinks, except ``ensure_bundled``, whose path the service itself
supplies), and the queries' refresh from the log.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
from msgspec import UNSET, UnsetType

from domain import decisions
from domain.decisions import Decision, has_values
from domain.events import ModelImported, ModelLoaded, ModelLoadFailed, ModelUnloaded
from domain.mapper import append, iter_all
from domain.projections import DEFAULT_HISTORY_TURNS, LLM, Projections, Turn, model_not_found
from engine.gguf import ModelInfo, read_model_info
from handlers.model_files import ProgressCallback, hash_file, run_in_thread
from storage.sqlite import SqliteEventStore
from storage.store import EventStore
from wire.api import RegistryDiagnostics
from wire.errors import ErrorCode, LamaError
from wire.identity import slugify
from wire.messages import ChatMessage, GenerationCompleted
from wire.params import GenerationParams, ModelParams
from wire.records import TopicAnalysis, TopicInfo

BUNDLED_NAME = "SmolLM2 135M Instruct"
_MAX_NAME = 200
_RETRIES = 4


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
        async for recorded in iter_all(self.store, self.view.position):
            self.view.apply(recorded)
        return self.view.position

    async def _execute(self, decide: Callable[[Projections], Decision], *, retry: bool = True) -> bool:
        """Decide on the current view and append; on a concurrent change, look again and re-decide.

        Returns whether anything new was stored.
        """
        async with self._lock:
            for attempt in range(_RETRIES):
                await self._catch_up()
                appends = decide(self.view)
                if not appends:
                    return False
                try:
                    stored = await append(self.store, appends)
                except LamaError as exc:
                    if exc.code is not ErrorCode.CONFLICT or not retry or attempt == _RETRIES - 1:
                        raise
                    continue
                await self._catch_up()
                return any(stored)
        raise AssertionError("unreachable")  # pragma: no cover

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
                           expected_sha256: str | None = None, checksum: str | None = None) -> LLM:
        """Register a GGUF file from a model directory (repeats: see ``domain.decisions``).

        ``expected_sha256``: refuse (``model_invalid``) a file whose hash differs. ``checksum``: the
        file's SHA-256 when the caller has just computed it (a download it verified), so the file is
        not read twice; None: hashed here.
        """
        resolved = self.resolve_import_path(path)
        return await self._import(resolved, name, generation=generation, load=load, provider=provider,
                                  progress=progress, expected_sha256=expected_sha256, checksum=checksum)

    async def _read_model_file(self, resolved: Path, checksum: str | None = None, *, name: str,
                               provider: str, creator: str, generation: GenerationParams | None,
                               load: ModelParams | None, progress: ProgressCallback | None = None) -> ModelImported:
        info: ModelInfo = await run_in_thread(read_model_info, resolved)
        if checksum is None:
            checksum = await hash_file(resolved, progress)
        return ModelImported(
            at=self._now(), name=name, filename=resolved.name, model_path=str(resolved), size=info.size,
            checksum=checksum, architecture=info.architecture, parameter_count=info.parameter_count,
            context_length=info.context_length, quantization=info.quantization, provider=provider,
            creator=creator, generation=generation if has_values(generation) else None,
            load=load if has_values(load) else None,
        )

    async def _import(self, resolved: Path, name: str | None, *, generation: GenerationParams | None,
                      load: ModelParams | None, provider: str, progress: ProgressCallback | None,
                      expected_sha256: str | None = None, checksum: str | None = None,
                      revive_removed: bool = True) -> LLM:
        display = (name or resolved.stem).strip()
        if not display or len(display) > _MAX_NAME:
            raise LamaError(ErrorCode.BAD_REQUEST, f"model name must be 1..{_MAX_NAME} characters", name=name)
        model_id = slugify(display)
        event = await self._read_model_file(resolved, checksum, name=display, provider=provider, creator=self.creator,
                                            generation=generation, load=load, progress=progress)
        if expected_sha256 is not None and event.checksum != expected_sha256.lower():
            raise LamaError(ErrorCode.MODEL_INVALID,
                            f"{resolved.name}: SHA-256 {event.checksum} does not match the expected {expected_sha256}",
                            path=str(resolved), sha256=event.checksum, expected_sha256=expected_sha256)
        await self._execute(lambda view: decisions.import_model(view, model_id, event, named=name is not None,
                                                                revive_removed=revive_removed))
        same = next((m for m in self.view.live_models() if m.checksum == event.checksum), None)
        if same is None:
            raise model_not_found(model_id, " (it was removed while importing)")
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
        if existing is not None and existing.model_path != str(resolved):
            # Same id, new path: re-register in place rather than under a second id.
            event = await self._read_model_file(resolved, name=existing.name, provider=existing.provider,
                                                creator=existing.creator, generation=existing.generation_params(),
                                                load=existing.model_params())
            await self._execute(lambda view: decisions.move_model_file(view, model_id, event))
        elif existing is None:
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

    # ------------------------------------------------------------------ model commands

    async def update_model(self, model_id: str, *, generation: GenerationParams | None = None,
                           load: ModelParams | None = None, reset: bool = False,
                           system_prompt: str | None | UnsetType = UNSET,
                           expected_version: int | None = None) -> LLM:
        """``models.update``: parameters and/or the system prompt, in one atomic append.

        ``system_prompt`` UNSET leaves it; None clears it (the service default). ``expected_version``:
        the ``version`` the caller saw; ``conflict`` if it moved on (also when only the prompt changes).
        """
        if not (reset or has_values(generation) or has_values(load)) and system_prompt is UNSET:
            raise LamaError(ErrorCode.BAD_REQUEST, "nothing to change: give generation, load, reset or systemPrompt",
                            model_id=model_id, field="$.generation")
        await self._execute(lambda view: decisions.update_model(
            view, model_id, self._now(), generation=generation, load=load, reset=reset, system_prompt=system_prompt,
            expected_version=expected_version), retry=expected_version is None)
        return self.view.models[model_id]

    async def update_params(self, model_id: str, generation: GenerationParams | None = None,
                            load: ModelParams | None = None, *, reset: bool = False,
                            expected_version: int | None = None) -> LLM:
        """Lay overrides over the model's stored parameters (``reset``: replace them all)."""
        return await self.update_model(model_id, generation=generation, load=load, reset=reset,
                                       expected_version=expected_version)

    async def set_model_system_prompt(self, model_id: str, system_prompt: str | None) -> LLM:
        """The system prompt this model's conversations start with (None: the service default)."""
        return await self.update_model(model_id, system_prompt=system_prompt)

    async def activate(self, model_id: str) -> LLM:
        await self._execute(lambda view: decisions.activate(view, model_id, self._now()))
        return self.view.models[model_id]

    async def deactivate(self, model_id: str) -> LLM:
        await self._execute(lambda view: decisions.deactivate(view, model_id, self._now()))
        return self.view.models[model_id]

    async def remove(self, model_id: str) -> LLM:
        """Soft delete. A loaded model should be unloaded first (``ModelsRuntime.remove`` does both)."""
        await self._execute(lambda view: decisions.remove(view, model_id, self._now()))
        return self.view.models[model_id]

    async def record_usage(self, model_id: str) -> LLM:
        await self._execute(lambda view: decisions.record_usage(view, model_id, self._now()))
        return self.view.models[model_id]

    async def record_loaded(self, model_id: str, handle: str, n_ctx: int, load_ms: float = 0.0) -> None:
        event = ModelLoaded(at=self._now(), handle=handle, n_ctx=n_ctx, load_ms=round(load_ms, 3))
        await self._execute(lambda view: decisions.record_runtime(view, model_id, event))

    async def record_unloaded(self, model_id: str, reason: str = "requested") -> None:
        event = ModelUnloaded(at=self._now(), reason=reason)  # type: ignore[arg-type]
        await self._execute(lambda view: decisions.record_runtime(view, model_id, event))

    async def record_load_failed(self, model_id: str, error: LamaError) -> None:
        event = ModelLoadFailed(at=self._now(), code=error.code.value, message=error.message)
        await self._execute(lambda view: decisions.record_runtime(view, model_id, event))

    # ------------------------------------------------------------------ topics

    async def create_topic(self, topic_id: str, name: str | None = None, model_id: str | None = None,
                           created_by: str | None = None, system_prompt: str | None = None) -> TopicInfo:
        """A new topic room, optionally bound to a model; ``conflict`` if it exists."""
        await self._execute(lambda view: decisions.create_topic(
            view, topic_id, self._now(), name=name, model_id=model_id, created_by=created_by,
            system_prompt=system_prompt))
        return self.view.topic_info(self.view.topics[topic_id])

    async def ensure_topic(self, topic_id: str, created_by: str | None = None) -> TopicInfo:
        await self._execute(lambda view: decisions.ensure_topic(view, topic_id, self._now(), created_by))
        return self.view.topic_info(self.view.topics[topic_id])

    async def set_topic_system_prompt(self, topic_id: str, system_prompt: str | None) -> TopicInfo:
        """The topic's own system prompt, over its model's (creating the room if needed)."""
        await self._execute(lambda view: decisions.set_topic_system_prompt(view, topic_id, system_prompt,
                                                                           self._now()))
        return self.view.topic_info(self.view.topics[topic_id])

    async def bind_topic(self, topic_id: str, model_id: str | None) -> TopicInfo:
        """Bind a topic to a model (creating the room if needed); ``None`` follows the active model again."""
        await self._execute(lambda view: decisions.bind_topic(view, topic_id, model_id, self._now()))
        return self.view.topic_info(self.view.topics[topic_id])

    async def set_topic_analysis(self, topic_id: str, enabled: bool) -> TopicInfo:
        """The topic's own analysis switch (the service's ``analysis`` setting is over it)."""
        await self._execute(lambda view: decisions.set_topic_analysis(view, topic_id, enabled, self._now()))
        return self.view.topic_info(self.view.topics[topic_id])

    async def record_analysis(self, topic_id: str, analysis: TopicAnalysis) -> TopicAnalysis | None:
        """Record a topic analysis (``topic.analysed``; its time is the registry's clock); the analysis as
        recorded, or None when the topic already had one as recent or was switched off meanwhile."""
        at = self._now()
        if not await self._execute(lambda view: decisions.record_analysis(view, topic_id, analysis, at)):
            return None
        return self.view.topics[topic_id].analysis

    async def record_message(self, message: ChatMessage, *, unanswered: str | None = None) -> bool:
        """Record a user message as seen (``unanswered``: settled without a reply). False if it was already."""
        at = self._now()
        return await self._execute(lambda view: decisions.record_message(view, message, at, unanswered=unanswered))

    async def record_reply(self, message: ChatMessage, reply: ChatMessage, completed: GenerationCompleted) -> bool:
        """Record the user message, the AI's reply and the model's use in ONE atomic append.

        Returns False when the reply was already recorded (a retry or a redelivery stores nothing twice).
        """
        at = self._now()
        return await self._execute(lambda view: decisions.record_reply(view, message, reply, completed, at))

    # ------------------------------------------------------------------ queries

    async def list_models(self, include_deleted: bool = False) -> list[LLM]:
        await self.refresh()
        models = self.view.models.values() if include_deleted else self.view.live_models()
        return sorted(models, key=lambda m: (m.created, m.id))

    async def get_model(self, model_id: str, include_deleted: bool = True) -> LLM:
        await self.refresh()
        m = self.view.models.get(model_id)
        if m is None or (m.deleted and not include_deleted):
            raise model_not_found(model_id)
        return m

    async def active_model(self) -> LLM | None:
        await self.refresh()
        return self.view.active_model()

    async def list_topics(self) -> list[TopicInfo]:
        await self.refresh()
        return [self.view.topic_info(r) for r in sorted(self.view.topics.values(), key=lambda r: (r.created, r.id))]

    async def get_topic(self, topic_id: str) -> TopicInfo:
        decisions.check_topic(topic_id)
        await self.refresh()
        room = self.view.topics.get(topic_id)
        if room is None:
            raise LamaError(ErrorCode.NOT_FOUND, f"topic {topic_id!r} not found", topic=topic_id)
        return self.view.topic_info(room)

    async def model_for_topic(self, topic_id: str, requested: str | None = None, *, refresh: bool = True) -> LLM:
        """Who answers in ``topic_id``: the requested model, else the topic's, else the active one.

        ``refresh=False`` answers from the view as it stands (see :class:`RegistryDirectory`).
        """
        if refresh:
            await self.refresh()
        return self.view.model_for(topic_id, requested)

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
