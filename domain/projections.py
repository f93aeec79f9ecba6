"""Read models derived from the event log: the seed's ``LLM`` record, topic rooms, conversations.

:class:`Projections` is a pure fold over :class:`~domain.mapper.RecordedEvent`:
``apply`` never looks at a clock, a file or another service, so rebuilding it
from the log gives exactly the state that was kept incrementally
(``tests/test_projections.py`` checks that with random command sequences).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING
from datetime import UTC, datetime

import msgspec
from msgspec.structs import replace

from domain.events import (
    MODEL_STREAM_PREFIX,
    TOPIC_STREAM_PREFIX,
    DomainEvent,
    ModelActivated,
    ModelDeactivated,
    ModelImported,
    ModelLoaded,
    ModelLoadFailed,
    ModelParametersChanged,
    ModelSystemPromptSet,
    ModelRemoved,
    ModelUnloaded,
    ModelUsed,
    TopicCreated,
    TopicMessageSeen,
    TopicModelBound,
    TopicSystemPromptSet,
    TopicReplyPosted,
    TopicAnalysed,
    TopicAnalysisSwitched,
)
from domain.mapper import RecordedEvent, iter_all
from wire.errors import ErrorCode, LamaError
from wire.identity import person_id_for
from wire.params import GenerationParams, ModelParams
from wire.records import GENERATION_FIELDS, LLM, LOAD_FIELDS, TopicAnalysis, TopicInfo

if TYPE_CHECKING:
    from storage.store import EventStore



def model_not_found(model_id: str, why: str = "") -> LamaError:
    return LamaError(ErrorCode.MODEL_NOT_FOUND, f"model {model_id!r} not found{why}", model_id=model_id)


def iso_ms(at: int) -> str:
    return datetime.fromtimestamp(at / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TopicRoom(msgspec.Struct, frozen=True, rename="camel"):
    """A topic as the registry knows it. ``model_id`` null: it follows the active model."""

    id: str
    name: str | None
    model_id: str | None
    person_id: str | None
    """The bound model's AI identity (null when unbound: it is the active model's)."""
    created_by: str | None
    created: int
    modified: int
    message_count: int
    reply_count: int
    version: int
    system_prompt: str | None = None
    analysis: TopicAnalysis | None = None
    """The latest ``topic.analysed``."""
    analysis_enabled: bool = True


class Turn(msgspec.Struct, frozen=True, rename="camel"):
    message_id: str
    author_id: str
    text: str
    is_ai: bool
    sent_at: str | None = None
    reply_to: str | None = None
    model_id: str | None = None
    unanswered: str | None = None
    """Why a user message got no reply (``cancelled``, ...); None for answered messages and replies."""


class RegistryState(msgspec.Struct, frozen=True):
    """Everything the projections hold, as one comparable value."""

    position: int
    active_model_id: str | None
    models: dict[str, LLM]
    topics: dict[str, TopicRoom]
    history: dict[str, tuple[Turn, ...]]
    seen: dict[str, frozenset[str]]
    unanswered: dict[str, frozenset[str]]
    replies: dict[str, dict[str, TopicReplyPosted]]
    ai_person_ids: frozenset[str]


#: Turns of a topic's conversation kept in memory unless told otherwise.
DEFAULT_HISTORY_TURNS = 512


class Projections:
    """The registry's read models, kept by applying stored events in position order.

    Memory is bounded per topic where text is kept: the last ``history_turns`` turns
    and the reply events of those turns (the log keeps everything; prompts only use the
    tail). The message ids a topic has seen, answered or settled without a reply are
    kept whole: they are what makes an answer exactly-once, and an id is small.
    """

    def __init__(self, history_turns: int = DEFAULT_HISTORY_TURNS) -> None:
        self.history_turns = history_turns
        self.position = 0
        self.event_count = 0
        self.active_model_id: str | None = None
        self.models: dict[str, LLM] = {}
        self.topics: dict[str, TopicRoom] = {}
        self.history: dict[str, collections.deque[Turn]] = {}
        self.seen: dict[str, set[str]] = {}
        # Settled without a reply (cancelled, failed to record, ...): never answered later.
        self.unanswered: dict[str, set[str]] = {}
        # topic -> user message id -> the reply event (kept whole: a redelivery republishes it);
        # the oldest go once a topic holds more than history_turns of them.
        self.replies: dict[str, dict[str, TopicReplyPosted]] = {}
        self.replied: dict[str, set[str]] = {}
        # Every identity a model of ours ever spoke with, removed models included: never answer those.
        self.ai_person_ids: set[str] = set()

    @classmethod
    async def rebuild(cls, store: EventStore, page_size: int = 5000,
                      history_turns: int = DEFAULT_HISTORY_TURNS) -> "Projections":
        view = cls(history_turns)
        async for recorded in iter_all(store, 0, page_size):
            view.apply(recorded)
        return view

    # -- queries

    def state(self) -> RegistryState:
        return RegistryState(
            position=self.position,
            active_model_id=self.active_model_id,
            models=dict(self.models),
            topics=dict(self.topics),
            history={t: tuple(h) for t, h in self.history.items()},
            seen={t: frozenset(s) for t, s in self.seen.items()},
            unanswered={t: frozenset(s) for t, s in self.unanswered.items()},
            replies={t: dict(r) for t, r in self.replies.items()},
            ai_person_ids=frozenset(self.ai_person_ids),
        )

    def live_models(self) -> list[LLM]:
        return [m for m in self.models.values() if not m.deleted]

    def active_model(self) -> LLM | None:
        return self.models.get(self.active_model_id) if self.active_model_id else None

    def live_model(self, model_id: str) -> LLM:
        """The model, or ``model_not_found`` if it never existed or was removed."""
        m = self.models.get(model_id)
        if m is None:
            raise model_not_found(model_id)
        if m.deleted:
            raise model_not_found(model_id, " (it was removed)")
        return m

    def model_for(self, topic_id: str, requested: str | None = None) -> LLM:
        """Who answers in ``topic_id``: the requested model, else the topic's, else the active one."""
        if requested is not None:
            return self.live_model(requested)
        room = self.topics.get(topic_id)
        if room is not None and room.model_id is not None:
            m = self.models.get(room.model_id)
            if m is None or m.deleted:
                raise model_not_found(room.model_id, f" (topic {topic_id!r} is bound to it; bind another model)")
            return m
        active = self.active_model()
        if active is None:
            raise LamaError(ErrorCode.MODEL_NOT_FOUND, "no active model: import or pull one and activate it",
                            topic=topic_id)
        return active

    def topic_info(self, room: TopicRoom) -> TopicInfo:
        """The wire record of a room, with the model that answers there resolved."""
        model_id = room.model_id or self.active_model_id
        model = self.models.get(model_id) if model_id else None
        return TopicInfo(
            id=room.id, name=room.name, bound_model_id=room.model_id, model_id=model_id,
            person_id=model.person_id if model else None, created_by=room.created_by, created=room.created,
            modified=room.modified, message_count=room.message_count, reply_count=room.reply_count,
            version=room.version, system_prompt=room.system_prompt, analysis=room.analysis,
            analysis_enabled=room.analysis_enabled,
        )

    def has_seen(self, topic: str, message_id: str) -> bool:
        return message_id in self.seen.get(topic, ())

    def has_replied(self, topic: str, message_id: str) -> bool:
        """True once a reply to ``message_id`` in ``topic`` is recorded (the redelivery guard)."""
        return message_id in self.replied.get(topic, ())

    def settled_unanswered(self, topic: str, message_id: str) -> bool:
        """True once ``message_id`` is recorded as handled without a reply (cancelled, ...)."""
        return message_id in self.unanswered.get(topic, ())

    def reply_to(self, topic: str, message_id: str) -> TopicReplyPosted | None:
        return self.replies.get(topic, {}).get(message_id)

    def conversation(self, topic: str, limit: int | None = None) -> list[Turn]:
        turns = list(self.history.get(topic, ()))
        return turns[-limit:] if limit else turns

    # -- the fold

    def apply(self, stored: RecordedEvent) -> None:
        if stored.position <= self.position:
            raise LamaError(
                ErrorCode.INTERNAL,
                f"event at position {stored.position} applied after position {self.position}",
                position=stored.position, applied=self.position,
            )
        self.position = stored.position
        self.event_count += 1
        sid = stored.stream_id
        if sid.startswith(MODEL_STREAM_PREFIX):
            self._apply_model(sid[len(MODEL_STREAM_PREFIX):], stored.version, stored.event)
        elif sid.startswith(TOPIC_STREAM_PREFIX):
            self._apply_topic(sid[len(TOPIC_STREAM_PREFIX):], stored.version, stored.event)
        # Other streams belong to someone else; skipping them keeps old readers working on newer logs.

    def _apply_model(self, model_id: str, version: int, ev: DomainEvent) -> None:
        at = ev.at
        current = self.models.get(model_id)
        if isinstance(ev, ModelImported):
            m = self.models[model_id] = _imported(model_id, version, ev, current)
            self.ai_person_ids.add(m.person_id)
            return
        if current is None:
            return  # an event for a model never imported: nothing to project it onto
        m = replace(current, version=version)
        if isinstance(ev, ModelParametersChanged):
            m = replace(_with_params(m, ev.generation, ev.load, ev.reset), modified=at)
        elif isinstance(ev, ModelSystemPromptSet):
            m = replace(m, system_prompt=ev.system_prompt, modified=at)
        elif isinstance(ev, ModelActivated):
            previous = self.active_model_id
            if previous is not None and previous != model_id and previous in self.models:
                # Activation is exclusive even if a racing writer left the old one's deactivation out.
                self.models[previous] = replace(self.models[previous], active=False)
            self.active_model_id = model_id
            m = replace(m, active=True, modified=at)
        elif isinstance(ev, ModelDeactivated):
            if self.active_model_id == model_id:
                self.active_model_id = None
            m = replace(m, active=False, modified=at)
        elif isinstance(ev, ModelLoaded):
            m = replace(m, model_loaded=True, last_initialized=at, last_error=None)
        elif isinstance(ev, ModelUnloaded):
            m = replace(m, model_loaded=False)
        elif isinstance(ev, ModelLoadFailed):
            m = replace(m, model_loaded=False, last_error=f"{ev.code}: {ev.message}")
        elif isinstance(ev, ModelUsed):
            m = replace(m, usage_count=m.usage_count + 1, last_used=iso_ms(at))
        elif isinstance(ev, ModelRemoved):
            if self.active_model_id == model_id:
                self.active_model_id = None
            m = replace(m, deleted=True, active=False, modified=at)
        self.models[model_id] = m

    def _turns(self, topic: str) -> collections.deque[Turn]:
        turns = self.history.get(topic)
        if turns is None:
            turns = self.history[topic] = collections.deque(maxlen=self.history_turns)
        return turns

    def _apply_topic(self, topic: str, version: int, ev: DomainEvent) -> None:
        at = ev.at
        room = self.topics.get(topic)
        if room is None:
            # A message can arrive in a topic nobody created through the API; the room starts there.
            room = TopicRoom(topic, None, None, None, None, at, at, 0, 0, version)
        room = replace(room, version=version)
        if isinstance(ev, TopicCreated):
            room = replace(room, name=ev.name, created_by=ev.created_by, created=at, modified=at)
        elif isinstance(ev, TopicModelBound):
            pid = person_id_for(ev.model_id) if ev.model_id else None
            room = replace(room, model_id=ev.model_id, person_id=pid, modified=at)
        elif isinstance(ev, TopicSystemPromptSet):
            room = replace(room, system_prompt=ev.system_prompt, modified=at)
        elif isinstance(ev, TopicMessageSeen):
            self._turns(topic).append(
                Turn(ev.message_id, ev.author_id, ev.text, False, sent_at=ev.sent_at, unanswered=ev.unanswered))
            self.seen.setdefault(topic, set()).add(ev.message_id)
            if ev.unanswered:
                self.unanswered.setdefault(topic, set()).add(ev.message_id)
            room = replace(room, message_count=room.message_count + 1, modified=at)
        elif isinstance(ev, TopicReplyPosted):
            self._turns(topic).append(
                Turn(ev.message_id, ev.author_id, ev.text, True, sent_at=ev.sent_at, reply_to=ev.reply_to,
                     model_id=ev.model_id))
            replies = self.replies.setdefault(topic, {})
            replies[ev.reply_to] = ev
            if len(replies) > self.history_turns:
                del replies[next(iter(replies))]  # dicts keep insertion order: the oldest reply
            self.replied.setdefault(topic, set()).add(ev.reply_to)
            room = replace(room, reply_count=room.reply_count + 1, modified=at)
        elif isinstance(ev, TopicAnalysed):
            # Not a change anyone made to the room: ``modified`` stays.
            room = replace(room, analysis=TopicAnalysis(
                title=ev.title, keywords=tuple(ev.keywords), summary=ev.summary, language=ev.language,
                based_on_message_id=ev.based_on_message_id, model_id=ev.model_id, reply_count=ev.reply_count,
                analysed_at=at))
        elif isinstance(ev, TopicAnalysisSwitched):
            room = replace(room, analysis_enabled=ev.enabled, modified=at)
        self.topics[topic] = room


def _imported(model_id: str, version: int, ev: ModelImported, previous: LLM | None) -> LLM:
    at = ev.at
    m = LLM(
        id=model_id,
        name=ev.name,
        model_type=ev.model_type,
        filename=ev.filename,
        person_id=person_id_for(model_id),
        deleted=False,
        # Re-importing keeps birth date, usage, activation and load state: it is the same identity
        # (a moved file, a revived removal); loads and activation change only by their own events.
        active=bool(previous and previous.active and not previous.deleted),
        creator=ev.creator,
        created=previous.created if previous else at,
        modified=at,
        created_at=previous.created_at if previous else iso_ms(at),
        last_used=previous.last_used if previous else None,
        usage_count=previous.usage_count if previous else 0,
        size=ev.size,
        capabilities=tuple(ev.capabilities),
        last_initialized=previous.last_initialized if previous else 0,
        system_prompt=previous.system_prompt if previous else None,
        architecture=ev.architecture,
        context_length=ev.context_length,
        quantization=ev.quantization,
        checksum=ev.checksum,
        provider=ev.provider,
        model_loaded=bool(previous and previous.model_loaded),
        model_path=ev.model_path,
        parameter_count=ev.parameter_count,
        version=version,
    )
    return _with_params(m, ev.generation, ev.load, reset=True)


def _with_params(m: LLM, generation: GenerationParams | None, load: ModelParams | None, reset: bool) -> LLM:
    changes: dict[str, object] = {}
    if reset:
        changes.update({f: None for f in GENERATION_FIELDS})
        changes.update({f: None for f in LOAD_FIELDS})
    for params, fields in ((generation, GENERATION_FIELDS), (load, LOAD_FIELDS)):
        if params is None:
            continue
        for f in fields:
            value = getattr(params, f)
            if value is not None:
                changes[f] = tuple(value) if f == "stop" else value
    if generation is not None and (generation.grammar is not None or generation.json_schema is not None):
        # one setting: a new grammar replaces a stored schema and the other way round
        changes["grammar"], changes["json_schema"] = generation.grammar, generation.json_schema
    return replace(m, **changes) if changes else m
