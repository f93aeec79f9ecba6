"""The three roles of a lamabus deployment, as NATS subject permissions the broker enforces.

Everything here follows from the one endpoint table (``wire.api.ENDPOINTS``) and the topic subjects
(``bus.subjects``): an endpoint added to the table is an admin endpoint until it is named in
:data:`CHAT_ENDPOINTS`, so a new endpoint can never be forgotten open.

* ``service``: what a lamabus node needs: its API and intake (``<prefix>.>``), answering requests
  (``allow_responses``), its own JetStream streams and key-value bucket, nothing else.
* ``admin``: every ``<prefix>.api.*`` endpoint, ``$SRV`` discovery, and everything ``chat`` may do.
* ``chat``: post and cancel on topics, watch a topic's tokens and events, the read-only endpoints of
  :data:`CHAT_ENDPOINTS`, and a topic's history from JetStream (its own consumers), with no way to
  delete, purge or edit a stream or someone else's consumer. It cannot publish on ``.evt``/``.tok``,
  so it cannot forge a reply.

:func:`grant` is the small, documented answer for other front doors (the OpenAI gateway maps its
Bearer keys to these roles): which endpoints and which topic actions a role may use.
:func:`permissions` is the same as NATS subjects, for a server config (``bus/auth/embedded.py``) or
an operator writing their own (docs/security.md, generated from :func:`roles_markdown`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Literal, Sequence

from bus.node.cluster import bucket_name, work_stream_name
from bus.node.intake import CONSUMER as INTAKE_CONSUMER
from bus.subjects import Subjects
from storage.jetstream import registry_stream_name
from wire.api import ENDPOINTS
from wire.messages import valid_topic_id

Role = Literal["service", "admin", "chat"]
ROLES: tuple[Role, ...] = ("service", "admin", "chat")

#: The endpoints a ``chat`` user may call: reading, never changing. Every other row of the table is admin's.
CHAT_ENDPOINTS: frozenset[str] = frozenset({"topics.list", "topics.get", "models.list", "diagnostics"})

TopicAction = Literal["post", "cancel", "watch", "history", "answer"]
#: ``post``: publish a chat message on ``.msg``; ``cancel``: request on ``.cancel``; ``watch``: subscribe to
#: ``.tok``/``.evt``/``.msg``; ``history``: read the topic from JetStream; ``answer``: publish ``.evt``/``.tok``
#: and the AI's reply (the service only).
TOPIC_ACTIONS: tuple[TopicAction, ...] = ("post", "cancel", "watch", "history", "answer")

_TOPIC_ACTIONS: dict[Role, frozenset[TopicAction]] = {
    "service": frozenset(TOPIC_ACTIONS),
    "admin": frozenset({"post", "cancel", "watch", "history"}),
    "chat": frozenset({"post", "cancel", "watch", "history"}),
}

for _name in CHAT_ENDPOINTS:  # a rename in the table must not leave the chat role pointing at nothing
    assert any(spec.name == _name for spec in ENDPOINTS), _name


@dataclasses.dataclass(frozen=True)
class Grant:
    """What a role may use, in lamabus's terms (not subjects): endpoint names of ``wire.api.ENDPOINTS``
    (``models.list``) and topic actions (:data:`TOPIC_ACTIONS`)."""

    role: Role
    endpoints: frozenset[str]
    topic_actions: frozenset[TopicAction]

    def may_call(self, endpoint: str) -> bool:
        return endpoint in self.endpoints

    def may(self, action: TopicAction) -> bool:
        return action in self.topic_actions


def grant(role: Role) -> Grant:
    """Which API endpoints and topic actions ``role`` may use (generated from the endpoint table).

    ``grant("chat").may_call("models.remove")`` is False; ``grant("chat").may("post")`` is True. The
    broker enforces the same through :func:`permissions`; a front door that is itself trusted (a gateway
    holding service or admin credentials) checks its callers with this before acting for them."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    names = [spec.name for spec in ENDPOINTS]
    endpoints = frozenset(names if role in ("service", "admin") else [n for n in names if n in CHAT_ENDPOINTS])
    return Grant(role, endpoints, _TOPIC_ACTIONS[role])


@dataclasses.dataclass(frozen=True)
class Permissions:
    """One user's NATS permissions (``permissions { publish {allow, deny}, subscribe {...}, allow_responses }``)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    allow_responses: bool = False

    def server_config(self) -> dict[str, Any]:
        """The ``permissions`` map of a nats-server config (also the shape of a user JWT's pub/sub)."""
        conf: dict[str, Any] = {"publish": {"allow": list(self.publish)}, "subscribe": {"allow": list(self.subscribe)}}
        if self.publish_deny:
            conf["publish"]["deny"] = list(self.publish_deny)
        if self.allow_responses:
            conf["allow_responses"] = True
        return conf


def _dedup(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _stream_api(stream: str) -> list[str]:
    """Every JetStream API subject that names ``stream`` (``$JS.API.STREAM.INFO.S``,
    ``$JS.API.CONSUMER.CREATE.S.name.filter``, ``$JS.API.CONSUMER.MSG.NEXT.S.name``, ``$JS.API.DIRECT.GET.S...``)."""
    return [f"$JS.API.*.*.{stream}", f"$JS.API.*.*.{stream}.>", f"$JS.API.*.*.*.{stream}",
            f"$JS.API.*.*.*.{stream}.>", f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>"]


def _read_topics_stream(stream: str, topics: Sequence[str] | None, prefix: str, *, delete: bool) -> list[str]:
    """Reading the topic stream through consumers of one's own: create (ephemeral or named), info, next.

    With ``topics`` the consumer must name its filter in the subject (``$JS.API.CONSUMER.CREATE.S.name.filter``,
    what nats-py and nats.js send for a named consumer with one filter), so only those topics can be read."""
    if topics is None:
        create = [f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.>"]
    else:
        create = [f"$JS.API.CONSUMER.CREATE.{stream}.*.{prefix}.topic.{t}.>" for t in topics]
    subjects = [*create, f"$JS.API.CONSUMER.INFO.{stream}.*", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
                f"$JS.API.STREAM.INFO.{stream}", "$JS.API.INFO", f"$JS.FC.{stream}.>"]
    if delete:
        subjects.append(f"$JS.API.CONSUMER.DELETE.{stream}.*")
    return subjects


def _service_consumers_denied(stream: str) -> list[str]:
    """The service's own durable consumer on the topic stream: nobody else may pull from, edit or delete it."""
    c = INTAKE_CONSUMER
    return [f"$JS.API.CONSUMER.*.{stream}.{c}", f"$JS.API.CONSUMER.*.{stream}.{c}.>",
            f"$JS.API.CONSUMER.*.*.{stream}.{c}", f"$JS.API.CONSUMER.*.*.{stream}.{c}.>"]


def permissions(role: Role, *, prefix: str = "lama", topics: Sequence[str] | None = None,
                inbox: str = "_INBOX") -> Permissions:
    """``role``'s NATS permissions for a deployment with subject ``prefix``.

    ``topics`` (``chat`` only): limit the user to these topic ids (NATS wildcards match whole subject
    tokens, so a per-user *prefix* such as ``alice-*`` cannot be a permission; a list of the user's topics
    can). Such a user should also have an inbox of its own (``inbox="_INBOX_alice"``, and the client's
    ``inbox_prefix`` set to match), or it could read other users' replies on the shared ``_INBOX``."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if topics is not None:
        if role != "chat":
            raise ValueError("only a chat user is limited to topics")
        bad = [t for t in topics if not valid_topic_id(t)]
        if bad or not topics:
            raise ValueError(f"topics must be topic ids: {bad or 'none given'}")
    s = Subjects(prefix)
    topics_stream = s.stream_name
    inboxes = f"{inbox}.>"
    if role == "service":
        streams = [topics_stream, work_stream_name(s), registry_stream_name(prefix), "KV_" + bucket_name(s)]
        return Permissions(
            publish=_dedup([f"{prefix}.>", inboxes, "$SRV.>", "$JS.API.INFO", f"$KV.{bucket_name(s)}.>",
                            *[subject for stream in streams for subject in _stream_api(stream)]]),
            subscribe=_dedup([f"{prefix}.>", inboxes, "$SRV.>"]),
            allow_responses=True)
    tokens = ["*"] if topics is None else list(topics)
    publish = [f"{prefix}.topic.{t}.{kind}" for t in tokens for kind in ("msg", "cancel")]
    subscribe = [f"{prefix}.topic.{t}.{kind}" for t in tokens for kind in ("tok", "evt", "msg")] + [inboxes]
    if topics is None:
        subscribe.append(f"{prefix}.registry.evt.>")  # the page refreshes its topic list when the registry moves
    publish += _read_topics_stream(topics_stream, topics, prefix, delete=role == "admin")
    if role == "admin":
        publish += [f"{prefix}.api.>", "$SRV.>"]
    else:
        publish += [spec.subject(s.api) for spec in ENDPOINTS if spec.name in CHAT_ENDPOINTS]
    return Permissions(publish=_dedup(publish), subscribe=_dedup(subscribe),
                       publish_deny=tuple(_service_consumers_denied(topics_stream)))


def roles_markdown(prefix: str = "lama") -> str:
    """The roles section of docs/security.md: endpoints per role, then each role's subjects
    (tests/test_security_roles.py checks the document holds exactly this)."""
    lines = ["| endpoint | " + " | ".join(ROLES) + " |", "|---|" + "---|" * len(ROLES)]
    grants = {role: grant(role) for role in ROLES}
    for spec in ENDPOINTS:
        marks = ["yes" if grants[r].may_call(spec.name) else "no" for r in ROLES]
        lines.append(f"| `{prefix}.api.{spec.name}` | " + " | ".join(marks) + " |")
    lines += ["", "| topic action | " + " | ".join(ROLES) + " |", "|---|" + "---|" * len(ROLES)]
    for action in TOPIC_ACTIONS:
        lines.append(f"| {action} | " + " | ".join("yes" if grants[r].may(action) else "no" for r in ROLES) + " |")
    for role in ROLES:
        p = permissions(role, prefix=prefix)
        lines += ["", f"`{role}` (prefix `{prefix}`{', allow_responses' if p.allow_responses else ''}):", ""]
        lines.append("- publish: " + ", ".join(f"`{x}`" for x in p.publish))
        if p.publish_deny:
            lines.append("- publish denied: " + ", ".join(f"`{x}`" for x in p.publish_deny))
        lines.append("- subscribe: " + ", ".join(f"`{x}`" for x in p.subscribe))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m bus.auth.roles [PREFIX]: the roles section of docs/security.md
    import sys

    print(roles_markdown(sys.argv[1] if len(sys.argv) > 1 else "lama"), end="")
