"""The registry's decisions: given the projections and a command, which events follow.

Each function is pure: it reads the view, raises a coded :class:`LamaError`
when the command cannot be done, returns ``None`` when there is nothing to do
(the command is already in effect: that is what makes repeating one harmless),
and otherwise the :class:`Append` list to store atomically, with the stream
versions it decided on. The application service (``handlers.registry``)
appends them and, on a concurrent change, re-reads and asks again.

Rules worth knowing:

* Importing a file whose checksum is already registered under the same id (or
  with no name given) is idempotent. The same file under another explicit
  name, or another file under a taken id, is a ``conflict``. A removed
  model's id can be imported again: the record comes back (same person id,
  usage kept).
* Exactly one model is active: activating B appends "deactivated" to the old
  one and "activated" to B in one transaction.
* Removing is a soft delete; removing the active model deactivates it in the
  same append.
* A topic's user message and the AI's reply (plus the model's usage) are
  recorded in one atomic append, with event ids derived from the topic and
  message id: a redelivered message can never be recorded, nor answered, twice.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import msgspec
from msgspec import UNSET, UnsetType

from domain.events import (
    DomainEvent,
    ModelActivated,
    ModelDeactivated,
    ModelImported,
    ModelParametersChanged,
    ModelRemoved,
    ModelSystemPromptSet,
    ModelUsed,
    TopicCreated,
    TopicMessageSeen,
    TopicModelBound,
    TopicReplyPosted,
    TopicSystemPromptSet,
    TopicAnalysed,
    TopicAnalysisSwitched,
    model_stream,
    topic_stream,
)
from domain.mapper import Append, Keyed
from domain.projections import Projections, TopicRoom, model_not_found
from wire.errors import ErrorCode, LamaError, stream_conflict
from wire.messages import ChatMessage, GenerationCompleted, valid_topic_id
from wire.params import GenerationParams, ModelParams
from wire.records import TopicAnalysis

NO_STREAM = 0
"""``expected_version`` for "the stream must not exist yet"."""
ANY: None = None
"""``expected_version`` for "no check"."""

Decision = list[Append] | None


def has_values(params: msgspec.Struct | None) -> bool:
    return params is not None and any(getattr(params, f) is not None for f in params.__struct_fields__)


def check_topic(topic_id: str) -> None:
    if not isinstance(topic_id, str) or not valid_topic_id(topic_id):
        raise LamaError(ErrorCode.BAD_REQUEST,
                        f"invalid topic id {topic_id!r}: use 1-128 characters of A-Z a-z 0-9 _ -",
                        topic=topic_id)


# ---------------------------------------------------------------------------- models


def import_model(view: Projections, model_id: str, event: ModelImported, *, named: bool,
                 revive_removed: bool = True) -> Decision:
    """Register ``event``'s file under ``model_id``; ``named``: the caller chose the name."""
    same_file = next((m for m in view.live_models() if m.checksum == event.checksum), None)
    if same_file is not None:
        if not named or same_file.id == model_id:
            return None  # idempotent: this file is registered already
        raise LamaError(ErrorCode.CONFLICT, f"{event.filename} is already registered as {same_file.id!r}",
                        model_id=same_file.id, checksum=event.checksum)
    existing = view.models.get(model_id)
    if existing is not None and not existing.deleted:
        raise LamaError(ErrorCode.CONFLICT,
                        f"model id {model_id!r} is taken by another file ({existing.filename}); choose another name",
                        model_id=model_id)
    if existing is not None and not revive_removed:
        return None
    expected = existing.version if existing is not None else NO_STREAM
    return [Append(model_stream(model_id), [event], expected)]


def move_model_file(view: Projections, model_id: str, event: ModelImported) -> Decision:
    """Re-register a live model at a new path (a new virtualenv moved the bundled file)."""
    current = view.live_model(model_id)
    if current.model_path == event.model_path:
        return None
    return [Append(model_stream(model_id), [event], current.version)]


def update_model(view: Projections, model_id: str, at: int, *, generation: GenerationParams | None = None,
                 load: ModelParams | None = None, reset: bool = False,
                 system_prompt: str | None | UnsetType = UNSET, expected_version: int | None = None) -> Decision:
    """Parameters and/or the system prompt, in one append. ``system_prompt`` UNSET leaves it; None clears it.

    ``expected_version`` is checked even when nothing changes, so a stale caller always hears ``conflict``.
    """
    m = view.live_model(model_id)
    events: list[DomainEvent] = []
    if reset or has_values(generation) or has_values(load):
        events.append(ModelParametersChanged(at=at, generation=generation if has_values(generation) else None,
                                             load=load if has_values(load) else None, reset=reset))
    if system_prompt is not UNSET and system_prompt != m.system_prompt:
        events.append(ModelSystemPromptSet(at=at, system_prompt=system_prompt))
    expected = m.version if expected_version is None else expected_version
    if not events:
        if expected != m.version:
            raise stream_conflict(model_stream(model_id), expected, m.version)
        return None
    return [Append(model_stream(model_id), events, expected)]


def activate(view: Projections, model_id: str, at: int) -> Decision:
    m = view.live_model(model_id)
    if view.active_model_id == model_id:
        return None
    appends = []
    previous = view.active_model()
    if previous is not None:
        appends.append(Append(model_stream(previous.id), [ModelDeactivated(at=at, reason="replaced")],
                              previous.version))
    appends.append(Append(model_stream(model_id), [ModelActivated(at=at)], m.version))
    return appends


def deactivate(view: Projections, model_id: str, at: int) -> Decision:
    m = view.live_model(model_id)
    if not m.active:
        return None
    return [Append(model_stream(model_id), [ModelDeactivated(at=at, reason="requested")], m.version)]


def remove(view: Projections, model_id: str, at: int) -> Decision:
    """Soft delete: the record stays (``deleted``), so its identity and history do too."""
    m = view.live_model(model_id)
    events: list[DomainEvent] = []
    if m.active:
        events.append(ModelDeactivated(at=at, reason="removed"))
    events.append(ModelRemoved(at=at))
    return [Append(model_stream(model_id), events, m.version)]


def record_usage(view: Projections, model_id: str, at: int) -> Decision:
    view.live_model(model_id)
    return [Append(model_stream(model_id), [ModelUsed(at=at)], ANY)]


def record_runtime(view: Projections, model_id: str, event: DomainEvent) -> Decision:
    """Facts about a node's engine (loaded, unloaded, failed): recorded even for a model removed meanwhile."""
    if model_id not in view.models:
        raise model_not_found(model_id)
    return [Append(model_stream(model_id), [event], ANY)]


# ---------------------------------------------------------------------------- topics


def create_topic(view: Projections, topic_id: str, at: int, *, name: str | None = None,
                 model_id: str | None = None, created_by: str | None = None,
                 system_prompt: str | None = None) -> Decision:
    """A new topic room, optionally bound to a model; ``conflict`` if it exists."""
    check_topic(topic_id)
    if topic_id in view.topics:
        raise LamaError(ErrorCode.CONFLICT, f"topic {topic_id!r} exists", topic=topic_id)
    events: list[DomainEvent] = [TopicCreated(at=at, name=name, created_by=created_by)]
    if model_id is not None:
        view.live_model(model_id)
        events.append(TopicModelBound(at=at, model_id=model_id))
    if system_prompt is not None:
        events.append(TopicSystemPromptSet(at=at, system_prompt=system_prompt))
    return [Append(topic_stream(topic_id), events, NO_STREAM)]


def ensure_topic(view: Projections, topic_id: str, at: int, created_by: str | None = None) -> Decision:
    check_topic(topic_id)
    if topic_id in view.topics:
        return None
    return [Append(topic_stream(topic_id), [TopicCreated(at=at, created_by=created_by)], NO_STREAM)]


def _set_on_topic(view: Projections, topic_id: str, event: DomainEvent, already: Callable[[TopicRoom], bool],
                  at: int) -> Decision:
    """One setting of a topic's room: the room is created with it if there is none; nothing when
    ``already(room)`` says the room has it; else ``event``, fenced by the room's version."""
    room = view.topics.get(topic_id)
    if room is None:
        return [Append(topic_stream(topic_id), [TopicCreated(at=at), event], NO_STREAM)]
    if already(room):
        return None
    return [Append(topic_stream(topic_id), [event], room.version)]


def set_topic_system_prompt(view: Projections, topic_id: str, system_prompt: str | None, at: int) -> Decision:
    """The topic's own system prompt, over its model's (creating the room if needed)."""
    check_topic(topic_id)
    return _set_on_topic(view, topic_id, TopicSystemPromptSet(at=at, system_prompt=system_prompt),
                         lambda room: room.system_prompt == system_prompt, at)


def bind_topic(view: Projections, topic_id: str, model_id: str | None, at: int) -> Decision:
    """Bind a topic to a model (creating the room if needed); ``None`` follows the active model again."""
    check_topic(topic_id)
    if model_id is not None:
        view.live_model(model_id)
    return _set_on_topic(view, topic_id, TopicModelBound(at=at, model_id=model_id),
                         lambda room: room.model_id == model_id, at)


def set_topic_analysis(view: Projections, topic_id: str, enabled: bool, at: int) -> Decision:
    """The topic's own analysis switch (creating the room if needed)."""
    check_topic(topic_id)
    return _set_on_topic(view, topic_id, TopicAnalysisSwitched(at=at, enabled=enabled),
                         lambda room: room.analysis_enabled == enabled, at)


def record_analysis(view: Projections, topic_id: str, analysis: TopicAnalysis, at: int) -> Decision:
    """A topic's analysis, fenced by the room's version; nothing when the room has one as recent (made by
    another node that answered the topic meanwhile, or this one again) or was switched off meanwhile.
    The event id is derived from the reply it is based on, so the same analysis is stored once."""
    check_topic(topic_id)
    room = view.topics.get(topic_id)
    if room is None:
        raise LamaError(ErrorCode.NOT_FOUND, f"topic {topic_id!r} not found", topic=topic_id)
    if not room.analysis_enabled or (room.analysis is not None and room.analysis.reply_count >= analysis.reply_count):
        return None
    event = Keyed(TopicAnalysed(at=at, based_on_message_id=analysis.based_on_message_id, model_id=analysis.model_id,
                                title=analysis.title, keywords=tuple(analysis.keywords), summary=analysis.summary,
                                language=analysis.language, reply_count=analysis.reply_count),
                  f"{topic_id}/{analysis.based_on_message_id}/analysed")
    return [Append(topic_stream(topic_id), [event], room.version)]


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def _seen(message: ChatMessage, unanswered: str | None, at: int) -> Keyed:
    return Keyed(TopicMessageSeen(at=at, message_id=message.id, author_id=message.author_id, text=message.text,
                                  sent_at=_iso(message.sent_at), unanswered=unanswered),
                 f"{message.topic}/{message.id}/seen")


def record_message(view: Projections, message: ChatMessage, at: int, *, unanswered: str | None = None) -> Decision:
    """A user message seen (``unanswered``: settled without a reply); nothing if it was already."""
    check_topic(message.topic)
    if view.has_seen(message.topic, message.id):
        return None
    return [Append(topic_stream(message.topic), [_seen(message, unanswered, at)], ANY)]


def record_reply(view: Projections, message: ChatMessage, reply: ChatMessage, completed: GenerationCompleted,
                 at: int) -> Decision:
    """The user message, the AI's reply and the model's use, as one atomic append with derived ids."""
    topic = message.topic
    check_topic(topic)
    if view.has_replied(topic, message.id):
        return None
    key = f"{topic}/{message.id}"
    posted = Keyed(TopicReplyPosted(
        at=at, message_id=reply.id, reply_to=message.id, model_id=completed.model_id, author_id=reply.author_id,
        text=reply.text, sent_at=_iso(reply.sent_at), thinking=completed.thinking, tokens=completed.tokens,
        finish_reason=completed.finish_reason, usage=completed.usage, timing=completed.timing,
    ), f"{key}/reply")
    events = [posted] if view.has_seen(topic, message.id) else [_seen(message, None, at), posted]
    appends = [Append(topic_stream(topic), events, ANY)]
    if completed.model_id in view.models:
        appends.append(Append(model_stream(completed.model_id), [Keyed(ModelUsed(at=at), f"{key}/used")], ANY))
    return appends
