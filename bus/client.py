"""A small async client for lamabus: post a message, stream the reply.

    async with LamabusClient.connect("nats://127.0.0.1:4222") as client:
        async for item in client.ask("demo", "Hello"):
            if isinstance(item, GenerationToken):
                print(item.text, end="")
            else:               # GenerationCompleted (or GenerationCancelled) ends the stream
                print(item.timing.tokens_per_second)
"""

from __future__ import annotations

import asyncio
import functools
import re
import uuid
from datetime import datetime, timezone
from typing import Any, AsyncIterator, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError

from bus.auth.credentials import Credentials
from bus.broker.connection import Denials, connect, guarded, redact_url
from bus.node.publisher import MSG_ID
from bus.subjects import Subjects
from wire.api import ApiRequest, endpoint_for
from wire.decoding import decode_untrusted
from wire.errors import ErrorBody, ErrorCode, LamaError
from wire.messages import (
    CancelReply,
    ChatMessage,
    GenerationCancel,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    GenerationToken,
    MessageRejected,
    TopicEvent,
    decode_topic_event,
    encode,
)
from wire.params import GenerationParams

R = TypeVar("R")
#: A node id as Settings.node_id allows it: one subject token, no wildcard.
_NODE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
AskItem = GenerationStarted | GenerationToken | GenerationCompleted | GenerationCancelled

_cancel_reply_decoder = msgspec.json.Decoder(CancelReply)
_error_decoder = msgspec.json.Decoder(ErrorBody)


def raise_for_error(msg: Msg) -> None:
    """Turn a micro error reply (Nats-Service-Error-Code + {code, message}) into a LamaError."""
    headers = msg.headers or {}
    if "Nats-Service-Error-Code" in headers:
        try:
            body = decode_untrusted(_error_decoder, msg.data)
        except LamaError:
            body = ErrorBody(ErrorCode.INTERNAL, headers.get("Nats-Service-Error", "unknown error"))
        raise LamaError.from_body(body)


class LamabusClient:
    def __init__(self, nc: Client, *, prefix: str = "lama", owns_connection: bool = False) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = Subjects(prefix)
        self._owns = owns_connection

    @classmethod
    def connect(cls, url: str, *, prefix: str = "lama", credentials: Credentials | None = None) -> "_Connecting":
        return _Connecting(url, prefix, credentials)

    @classmethod
    def for_settings(cls, settings: Any) -> "_Connecting":
        """Connect as the settings say (bus.config.Settings): their broker and credentials, else the local
        embedded broker as its admin (bus/auth/embedded.py)."""
        from bus.auth.embedded import client_login

        url, credentials = client_login(settings)
        return _Connecting(url, settings.prefix, credentials)

    async def close(self) -> None:
        if self._owns and not self.nc.is_closed:
            await self.nc.drain()

    async def post(self, message: ChatMessage, *, attempt: int = 0) -> None:
        """Publish a chat message durably (JetStream), de-duplicated by its id.

        ``attempt`` > 0 re-sends a message that was answered ``busy``: the same message id (lamabus
        answers it once) under a new broker de-duplication id, which the broker would otherwise
        drop as a copy for its duplicate window."""
        dedup = message.id if attempt == 0 else f"{message.id}.retry{attempt}"
        subject = self.subjects.msg(message.topic)
        await guarded(self.nc, (subject,), self.js.publish(subject, encode(message), headers={MSG_ID: dedup}))

    async def ask(self, topic: str, text: str, *, author_id: str = "user", model_id: str | None = None,
                  params: GenerationParams | None = None, message_id: str | None = None,
                  timeout: float = 300.0, attempt: int = 0) -> AsyncIterator[AskItem]:
        """Post ``text`` to ``topic`` and yield the reply as it streams.

        Yields ``generation.started``, then tokens in ``seq`` order, then the
        ``generation.completed`` (or ``generation.cancelled``) that ends it.
        Raises :class:`LamaError` for ``generation.failed`` or ``message.rejected``.
        """
        message = ChatMessage(id=message_id or str(uuid.uuid4()), topic=topic, author_id=author_id, text=text,
                              sent_at=datetime.now(timezone.utc), model_id=model_id, params=params)
        queue: asyncio.Queue[TopicEvent | LamaError] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            if msg.reply and msg.reply.startswith("$JS.ACK."):
                return  # stored bytes a JetStream consumer replays onto the subject: not lamabus's (docs/security.md)
            try:
                queue.put_nowait(decode_topic_event(msg.data))
            except LamaError:
                pass  # not ours to judge; someone else's traffic on the topic

        denials: Denials | None = getattr(self.nc, "denials", None)
        watch = denials.watching(self.subjects.tok(topic), self.subjects.evt(topic)) if denials else None
        if watch is not None:
            # A refused subscription to the topic's tokens or events is forbidden, not a timeout.
            watch.__enter__().add_done_callback(lambda refused: queue.put_nowait(refused.result()))
        tok_sub = await self.nc.subscribe(self.subjects.tok(topic), cb=on_msg)
        evt_sub = await self.nc.subscribe(self.subjects.evt(topic), cb=on_msg)
        try:
            # Subscriptions must be live on the server before the message can be answered.
            await self.nc.flush()
            await self.post(message, attempt=attempt)
            async with asyncio.timeout(timeout):
                while True:
                    event = await queue.get()
                    if isinstance(event, LamaError):
                        raise event
                    match event:
                        case GenerationToken(request_id=rid) | GenerationStarted(request_id=rid) if rid == message.id:
                            yield event
                        case GenerationCompleted(request_id=rid) | GenerationCancelled(request_id=rid) if rid == message.id:
                            yield event
                            return
                        case GenerationFailed(request_id=rid, error=error) if rid == message.id:
                            raise LamaError.from_body(error)
                        case MessageRejected(message_id=mid, error=error) if mid == message.id:
                            raise LamaError.from_body(error)
        except TimeoutError:
            raise LamaError(ErrorCode.TIMEOUT, f"no reply to {message.id} in {timeout:g} s") from None
        finally:
            if watch is not None:
                watch.__exit__(None, None, None)
            await tok_sub.unsubscribe()
            await evt_sub.unsubscribe()

    async def cancel(self, topic: str, request_id: str | None = None, *, timeout: float = 5.0) -> CancelReply:
        subject = self.subjects.cancel(topic)
        reply = await self.request(subject, encode(GenerationCancel(topic=topic, request_id=request_id)),
                                   timeout=timeout)
        raise_for_error(reply)
        return _cancel_reply_decoder.decode(reply.data)

    async def call(self, request: ApiRequest[R], *, node: str | None = None, timeout: float = 30.0) -> R:
        """Call the endpoint ``request`` belongs to (wire.api's table) and return its typed reply.

        ``node``: ask that node (its node id) rather than any node of the service: what concerns one
        node's engine (``models.load``/``unload``, ``diagnostics``, ``metrics``). A node that is not
        serving is ``not_found`` naming it. A coded error reply raises :class:`LamaError`; so does a
        reply that is not the endpoint's type."""
        spec = endpoint_for(request)
        if node is not None and not _NODE_ID.match(node):
            raise LamaError(ErrorCode.BAD_REQUEST, f"invalid node id {node!r}: must match [A-Za-z0-9_-]{{1,64}}",
                            field="node")
        api = self.subjects.api if node is None else self.subjects.node_api(node)
        try:
            reply = await self.request(spec.subject(api), encode(request), timeout=timeout)
        except NoRespondersError:
            if node is None:
                raise
            raise LamaError(ErrorCode.NOT_FOUND, f"node {node} is not serving", node=node) from None
        raise_for_error(reply)
        return decode_untrusted(_reply_decoder(spec.reply), reply.data)


    async def request(self, subject: str, data: bytes, *, timeout: float = 30.0) -> Msg:
        """A NATS request whose refusal by the broker (no permission for ``subject``) raises ``forbidden``
        at once rather than timing out."""
        return await guarded(self.nc, (subject,), self.nc.request(subject, data, timeout=timeout))


@functools.cache
def _reply_decoder(reply_type: type) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(reply_type)


class _Connecting:
    """``async with LamabusClient.connect(url) as client`` owns and closes the connection."""

    def __init__(self, url: str, prefix: str, credentials: Credentials | None = None) -> None:
        self.url = url
        self.prefix = prefix
        self.credentials = credentials
        self.client: LamabusClient | None = None

    async def __aenter__(self) -> LamabusClient:
        try:
            nc = await connect(self.url, name="lamabus-client", reconnect_forever=False, credentials=self.credentials)
        except (OSError, TimeoutError, NatsError) as exc:
            shown = redact_url(self.url)
            raise LamaError(ErrorCode.TIMEOUT, f"cannot reach NATS at {shown}: {exc or type(exc).__name__}",
                            url=shown) from None
        self.client = LamabusClient(nc, prefix=self.prefix, owns_connection=True)
        return self.client

    async def __aexit__(self, *exc_info: object) -> None:
        if self.client is not None:
            await self.client.close()
