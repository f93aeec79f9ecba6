"""Hostile payloads for lamabus's subjects, shared by tests/test_hostile_e2e.py and bench/soak.py (python -m bench.soak).

Every kind the issue names: random bytes, invalid UTF-8, deep nesting, wrong types,
unknown fields, huge strings up to the broker's max payload, bad topic ids in subject
and body, subject and body disagreeing, AI authors, and subjects that are not UTF-8
(sent over a raw socket: no NATS client will publish them).
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlparse

Expect = Literal["rejected", "ignored", "answered", "reply"]


@dataclass(frozen=True)
class Hostile:
    kind: str
    subject: bytes
    data: bytes
    expect: Expect
    """rejected: a message.rejected; ignored: deliberately nothing (AI author); answered: a normal
    reply (valid after all); reply: a request whose reply must be a coded error or an answer."""


def _chat(topic: str = "hostile", **over: object) -> dict:
    doc: dict = {"type": "chat.message", "id": str(uuid.uuid4()), "topic": topic, "authorId": "mallory",
                 "text": "hi", "sentAt": "2026-11-29T10:00:00Z", "params": {"maxTokens": 1, "temperature": 0}}
    doc.update(over)
    return doc


# Past the decoder's recursion limit on every supported Python (3.11: about 1,000; 3.12 and 3.13: about
# 10,000, their C code's own limit). Shallower nesting in an unknown field is skipped like any unknown field.
TOO_DEEP = 20_000


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def topic_payloads(prefix: str, ai_person_id: str, *, rng: random.Random, count: int,
                   max_payload: int = 1 << 20) -> list[Hostile]:
    """``count`` payloads for ``.msg`` subjects, cycling through the kinds."""
    msg = f"{prefix}.topic.hostile.msg".encode()

    def j(doc: dict) -> bytes:
        return json.dumps(doc).encode()

    makers = [
        lambda: Hostile("random bytes", msg, rng.randbytes(rng.randint(0, 200)), "rejected"),
        lambda: Hostile("invalid utf-8 in a field", msg, j(_chat()).replace(b'"hi"', b'"h\xff\xfei"'), "rejected"),
        lambda: Hostile("invalid utf-8 in the author", msg, j(_chat()).replace(b"mallory", b"mal\xc3\x28"), "rejected"),
        lambda: Hostile("deep nesting in an unknown field", msg,
                        j(_chat(extra=None)).replace(b"null", _deep(rng.randint(TOO_DEEP, 2 * TOO_DEEP)).encode()), "rejected"),
        lambda: Hostile("deep nesting alone", msg, _deep(rng.randint(1100, 20000)).encode(), "rejected"),
        lambda: Hostile("wrong type", msg, j(_chat(text=rng.choice([5, None, [], {"a": 1}]))), "rejected"),
        lambda: Hostile("wrong param", msg, j(_chat(params={"maxTokens": rng.choice([-1, 0, "x", 1e9])})), "rejected"),
        lambda: Hostile("bad date", msg, j(_chat(sentAt=rng.choice(["yesterday", 12, ""]))), "rejected"),
        lambda: Hostile("huge text", msg, j(_chat(text="x" * rng.randint(70_000, max_payload - 2048))), "rejected"),
        lambda: Hostile("bad topic in body", msg, j(_chat(topic=rng.choice(["a b", "", "é", "x" * 200]))), "rejected"),
        lambda: Hostile("subject and body disagree", msg, j(_chat(topic="elsewhere")), "rejected"),
        lambda: Hostile("bad topic in subject", f"{prefix}.topic.{rng.choice(['bad!', 'é', '%00'])}.msg".encode(),
                        j(_chat()), "rejected"),
        lambda: Hostile("wildcard topic in subject", f"{prefix}.topic.{rng.choice('>*')}.msg".encode(),
                        j(_chat(topic=">")), "rejected"),
        lambda: Hostile("non-utf-8 subject", f"{prefix}.topic.".encode() + b"bad\xff\xfe.msg", j(_chat()), "rejected"),
        lambda: Hostile("not a chat.message", msg, j({"type": "generation.token", "requestId": "x", "topic": "hostile",
                                                       "authorId": "a", "seq": 0, "text": "t"}), "rejected"),
        lambda: Hostile("no type", msg, j({k: v for k, v in _chat().items() if k != "type"}), "rejected"),
        lambda: Hostile("AI author", msg, j(_chat(authorId=ai_person_id)), "ignored"),
        lambda: Hostile("unknown field, otherwise valid", msg, j(_chat(somethingElse={"x": [1, 2]})), "answered"),
    ]
    return [makers[i % len(makers)]() for i in range(count)]


def cancel_payloads(prefix: str, *, rng: random.Random, count: int) -> list[Hostile]:
    cancel = f"{prefix}.topic.hostile.cancel".encode()
    makers = [
        lambda: Hostile("random bytes", cancel, rng.randbytes(rng.randint(0, 100)), "reply"),
        lambda: Hostile("invalid utf-8", cancel, b'{"type":"generation.cancel","topic":"host\xffile"}', "reply"),
        lambda: Hostile("deep nesting", cancel, _deep(rng.randint(1100, 20000)).encode(), "reply"),
        lambda: Hostile("topic disagrees", cancel, b'{"type":"generation.cancel","topic":"other"}', "reply"),
        lambda: Hostile("non-utf-8 subject", f"{prefix}.topic.".encode() + b"bad\xff\xfe.cancel",
                        b'{"type":"generation.cancel","topic":"x"}', "reply"),
        lambda: Hostile("valid", cancel, b'{"type":"generation.cancel","topic":"hostile"}', "reply"),
    ]
    return [makers[i % len(makers)]() for i in range(count)]


def api_payloads(prefix: str, *, rng: random.Random, count: int) -> list[Hostile]:
    endpoints = ["models.get", "models.list", "topics.create", "topics.bind", "llm.generate", "diagnostics"]
    makers = [
        lambda: rng.randbytes(rng.randint(1, 100)),
        lambda: b'{"type":"models.get","id":"\xff\xfe"}',
        lambda: _deep(rng.randint(1100, 20000)).encode(),
        lambda: b'{"type":"topics.create","id":5}',
        lambda: b'{"unknown":' + _deep(2000).encode() + b"}",
    ]
    return [Hostile("api", f"{prefix}.api.{endpoints[i % len(endpoints)]}".encode(), makers[i % len(makers)](),
                    "reply") for i in range(count)]


class RawPublisher:
    """A bare NATS protocol connection: publishes subjects no client library would send."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 4222
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> "RawPublisher":
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        await self._reader.readline()  # INFO
        self._writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n')
        await self.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._writer is not None
        self._writer.close()
        await self._writer.wait_closed()

    def publish(self, subject: bytes, data: bytes, reply: bytes = b"") -> None:
        assert self._writer is not None
        head = b"PUB " + subject + (b" " + reply if reply else b"") + b" " + str(len(data)).encode() + b"\r\n"
        self._writer.write(head + data + b"\r\n")

    async def flush(self) -> None:
        """Everything written so far has been processed by the server."""
        assert self._reader is not None and self._writer is not None
        self._writer.write(b"PING\r\n")
        await self._writer.drain()
        async with asyncio.timeout(30):
            while True:
                line = await self._reader.readline()
                if not line:
                    raise ConnectionError("the server closed the raw connection")
                if line.startswith(b"PONG"):
                    return
                if line.startswith(b"PING"):
                    self._writer.write(b"PONG\r\n")
