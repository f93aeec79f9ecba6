"""The request/reply API: a NATS micro service named ``lamabus``.

Every endpoint goes through :func:`boundary`, which decodes the request with a
decoder built once per endpoint, turns every exception into a coded error reply
(``Nats-Service-Error-Code`` header + JSON ``{code, message}`` body) and counts
it. A handler never kills its subscription.

nats-py runs one subscription's callbacks one after another, so a handler that
awaits for long (a pull, a model load, a generation) would hold up every later
request to the same endpoint. Such endpoints are ``concurrent``: the boundary
hands each request to a task in a task group the service owns and returns at
once; the task replies (or errors) through the same code path. At most
``max_in_flight`` requests of one endpoint run at a time; past that the
endpoint answers ``busy`` straight away. When the service stops, the task group
is cancelled and each running request is answered ``cancelled``.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Awaitable, Callable, TypeVar

import anyio
import msgspec
from anyio.abc import TaskGroup
from nats.aio.client import Client
from nats.micro import add_service
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.request import Request
from nats.micro.service import Service

from wire.api import EndpointSpec
from wire.decoding import decode_untrusted
from wire.errors import ErrorCode, LamaError
from wire.messages import encode

log = logging.getLogger("lamabus.api")

SERVICE_NAME = "lamabus"
SERVICE_VERSION = "0.1.0"
DEFAULT_MAX_IN_FLIGHT = 64

Req = TypeVar("Req")
ERROR_COUNTS: collections.Counter[str] = collections.Counter()
"""``<subject>.<code>`` -> errors answered, for every endpoint of every service in this process."""



def error_reply(exc: LamaError) -> tuple[str, str, bytes]:
    """(status, description, body) for a micro error reply.

    The description travels as a header value: one line of printable ASCII, whatever the
    message quotes from the request (the body keeps the message whole)."""
    description = exc.message.encode("ascii", "backslashreplace").decode("ascii")
    description = "".join(c if " " <= c <= "~" else " " for c in description)[:256]
    return str(exc.status), description, encode(exc.to_body())


ErrorHook = Callable[[LamaError], None]

_JS_ACK = "$JS.ACK."


def delivered_by_jetstream(reply: str | None) -> bool:
    """Whether a message came from a JetStream push consumer (its reply is the consumer's ack subject) rather
    than from a client. A chat login may create consumers on the topic stream and choose their deliver
    subject, which nats-server does not check against its permissions; what it delivers is never a
    request, a cancel or a token to act on."""
    return bool(reply) and reply.startswith(_JS_ACK)  # type: ignore[union-attr]


def boundary(request_type: type[Req], handler: Callable[[Req], Awaitable[Any]], *, name: str,
             concurrent: bool = False, task_group: TaskGroup | None = None,
             max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
             on_error: ErrorHook | None = None) -> Callable[[Request], Awaitable[None]]:
    """The micro handler for one endpoint. ``concurrent`` needs ``task_group`` (see the module docstring).

    ``on_error`` hears of every error this endpoint answers (``start_service`` feeds ``$SRV.STATS`` with it)."""
    if concurrent and task_group is None:
        raise ValueError(f"concurrent endpoint {name} needs a task group")
    decoder = msgspec.json.Decoder(request_type)
    in_flight = 0

    async def answer_error(request: Request, exc: LamaError) -> None:
        ERROR_COUNTS[f"{name}.{exc.code.value}"] += 1
        if on_error is not None:
            on_error(exc)
        await _respond_error(request, exc)

    async def process(request: Request) -> None:
        try:
            payload = decode_untrusted(decoder, request.data or b"{}")
            result = await handler(payload)
            await request.respond(encode(result))
        except LamaError as exc:
            await answer_error(request, exc)
        except anyio.get_cancelled_exc_class():
            # The service is stopping: say so rather than leave the caller to time out.
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await answer_error(request, LamaError(ErrorCode.CANCELLED, "the service is shutting down"))
            raise
        except Exception as exc:
            log.exception("endpoint %s failed", name)
            await answer_error(request, LamaError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))

    async def run(request: Request) -> None:
        nonlocal in_flight
        try:
            await process(request)
        finally:
            in_flight -= 1

    async def handle(request: Request) -> None:
        nonlocal in_flight
        if delivered_by_jetstream(request._msg.reply):
            # A push consumer replaying stored bytes onto this subject, not a caller: anyone who may post a
            # message could otherwise make the broker deliver it here as a request (docs/security.md). The
            # error reply acknowledges it, so it is not delivered again.
            log.warning("%s: refused a request delivered by a JetStream consumer", name)
            await answer_error(request, LamaError(ErrorCode.FORBIDDEN, "requests delivered by a JetStream "
                                                  "consumer are refused", subject=name))
            return
        if not concurrent:
            await process(request)
            return
        assert task_group is not None
        if in_flight >= max_in_flight:
            await answer_error(request, LamaError(
                ErrorCode.BUSY, f"{name}: {in_flight} requests are running; try again shortly",
                in_flight=in_flight, max_in_flight=max_in_flight))
            return
        in_flight += 1
        try:
            task_group.start_soon(run, request, name=f"api {name}")
        except BaseException:  # the group is closing: nothing will run it
            in_flight -= 1
            raise

    return handle


async def _respond_error(request: Request, exc: LamaError) -> None:
    status, description, body = error_reply(exc)
    try:
        await request.respond_error(status, description, data=body)
    except Exception:  # the requester may be gone; that must not end the subscription
        log.warning("could not send error reply", exc_info=True)


class Endpoint(msgspec.Struct, frozen=True):
    group: str  # "models", "llm", ... ("" for top-level endpoints)
    name: str
    request_type: Any
    handler: Callable[[Any], Awaitable[Any]]
    concurrent: bool = False
    """Run each request in its own task (long handlers: pull, load, generate)."""
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    description: str = ""

    def subject(self, api_prefix: str) -> str:
        return f"{api_prefix}.{self.group}.{self.name}" if self.group else f"{api_prefix}.{self.name}"

    @classmethod
    def from_spec(cls, spec: EndpointSpec, handler: Callable[[Any], Awaitable[Any]]) -> "Endpoint":
        group, _, name = spec.name.rpartition(".")
        return cls(group, name, spec.request, handler, concurrent=spec.concurrent, description=spec.description)

    @property
    def micro_name(self) -> str:
        return f"{self.group}-{self.name}" if self.group else self.name


async def start_service(nc: Client, api_prefix: str, endpoints: list[Endpoint],
                        task_group: TaskGroup | None = None) -> Service:
    """Add the micro service and its endpoints. ``task_group`` runs the concurrent endpoints' requests."""
    service = await add_service(nc, name=SERVICE_NAME, version=SERVICE_VERSION,
                                description="lamabus: local LLM chat on NATS")
    for ep in endpoints:
        subject = ep.subject(api_prefix)
        stats = _EndpointErrors()
        await service.add_endpoint(
            name=ep.micro_name, subject=subject,
            handler=boundary(ep.request_type, ep.handler, name=subject, concurrent=ep.concurrent,
                             task_group=task_group, max_in_flight=ep.max_in_flight, on_error=stats.count),
            metadata={"description": ep.description} if ep.description else None)
        stats.endpoint = service._endpoints[-1]
    return service


class _EndpointErrors:
    """Feeds ``num_errors``/``last_error`` of ``$SRV.STATS``.

    nats.micro counts an error only when the handler raises, and then answers it
    with a bare status and no body. Our boundary answers every error itself (with
    the ``{code, message}`` body the contract promises) and never raises, so it
    keeps the endpoint's figures here instead. They are private fields of
    nats-py's Endpoint (pinned in pyproject); ``tests/test_api_boundary.py``
    reads them back through ``$SRV.STATS``, so an upgrade that renames them fails there.
    """

    endpoint: Any = None

    def count(self, exc: LamaError) -> None:
        if self.endpoint is not None:
            self.endpoint._num_errors += 1
            self.endpoint._last_error = f"{exc.code.value}: {exc.message}"


async def serve_node(nc: Client, node_prefix: str, endpoints: list[Endpoint],
                     task_group: TaskGroup | None = None) -> Subscription:
    """The same endpoints on this node's own subjects, ``<node_prefix>.<endpoint>`` (``<prefix>.api.node.<id>``),
    without a queue group: a request there reaches this node and no other. Several nodes serve the
    API in one queue group; what concerns one node's engine (its llm handles, what it has loaded,
    its diagnostics and metrics) is asked here.

    Not part of the micro service (``$SRV.INFO`` lists the shared API once); every request still goes
    through :func:`boundary`, so the replies and errors are the same."""
    handlers: dict[str, Callable[[Request], Awaitable[None]]] = {}
    for ep in endpoints:
        suffix = ep.subject(node_prefix)[len(node_prefix) + 1:]
        handlers[suffix] = boundary(ep.request_type, ep.handler, name=ep.subject(node_prefix),
                                    concurrent=ep.concurrent, task_group=task_group, max_in_flight=ep.max_in_flight)

    async def dispatch(msg: Msg) -> None:
        request = Request(msg)
        handler = handlers.get(msg.subject[len(node_prefix) + 1:])
        if handler is None:
            await _respond_error(request, LamaError(ErrorCode.NOT_FOUND, f"no endpoint {msg.subject!r}",
                                                    subject=msg.subject))
            return
        try:
            await handler(request)
        except Exception:  # boundary answers everything; a raise here would only be logged by nats-py
            log.exception("node endpoint %s failed", msg.subject)

    return await nc.subscribe(f"{node_prefix}.>", cb=dispatch)
