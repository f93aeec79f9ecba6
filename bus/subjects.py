"""Every subject lamabus uses, derived from one prefix (DESIGN.md "Wire contract")."""

from __future__ import annotations

from dataclasses import dataclass

from wire.errors import ErrorCode, LamaError
from wire.messages import valid_topic_id

TOPICS_STREAM = "LAMA_TOPICS"


@dataclass(frozen=True)
class Subjects:
    prefix: str = "lama"

    def _topic(self, topic: str, kind: str) -> str:
        if not valid_topic_id(topic):
            raise LamaError(ErrorCode.BAD_REQUEST, f"invalid topic id {topic!r}: must match [A-Za-z0-9_-]{{1,128}}",
                            field="topic")
        return self.raw_topic_subject(topic, kind)

    def raw_topic_subject(self, token: str, kind: str) -> str:
        """A topic subject for a token as it came on the wire, not checked (to answer a bad one)."""
        return f"{self.prefix}.topic.{token}.{kind}"

    def msg(self, topic: str) -> str:
        return self._topic(topic, "msg")

    def tok(self, topic: str) -> str:
        return self._topic(topic, "tok")

    def evt(self, topic: str) -> str:
        return self._topic(topic, "evt")

    def cancel(self, topic: str) -> str:
        return self._topic(topic, "cancel")

    @property
    def all_msg(self) -> str:
        return f"{self.prefix}.topic.*.msg"

    @property
    def all_evt(self) -> str:
        return f"{self.prefix}.topic.*.evt"

    @property
    def all_cancel(self) -> str:
        return f"{self.prefix}.topic.*.cancel"

    @property
    def rejected(self) -> str:
        """``message.rejected`` for messages whose topic subject cannot carry an answer."""
        return f"{self.prefix}.rejected"

    @property
    def stream_name(self) -> str:
        # One stream per prefix, so two lamabus deployments can share a broker.
        suffix = "" if self.prefix == "lama" else "_" + self.prefix.replace(".", "_").replace("-", "_").upper()
        return TOPICS_STREAM + suffix

    @property
    def api(self) -> str:
        return f"{self.prefix}.api"

    def node_api(self, node: str) -> str:
        """One node's own copy of the API (no queue group): ``<prefix>.api.node.<node>.<endpoint>``."""
        return f"{self.prefix}.api.node.{node}"

    def registry_evt(self, stream_id: str) -> str:
        return f"{self.prefix}.registry.evt.{stream_id}"

    def topic_of(self, subject: str) -> str:
        """The raw topic token of a topic subject (not validated: the caller reports bad ones)."""
        head = f"{self.prefix}.topic."
        if not subject.startswith(head):
            raise ValueError(subject)
        return subject[len(head):].rsplit(".", 1)[0]
