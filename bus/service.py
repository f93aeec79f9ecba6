"""The request/reply API: a NATS micro service named ``lamabus``.

Every endpoint goes through :func:`boundary`, which decodes the request with a
decoder built once per endpoint, turns every exception into a coded error reply
(``Nats-Service-Error-Code`` header + JSON ``{code, message}`` body) and counts
it. A handler never kills its subscription.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Awaitable, Callable, TypeVar

import msgspec
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from wire.errors import ErrorCode, LamaError
from wire.messages import encode

log = logging.getLogger("lamabus.api")

SERVICE_NAME = "lamabus"
SERVICE_VERSION = "0.1.0"

Req = TypeVar("Req")
ERROR_COUNTS: collections.Counter[str] = collections.Counter()


class Empty(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A request that takes no arguments."""


def error_reply(exc: LamaError) -> tuple[str, str, bytes]:
    """(status, description, body) for a micro error reply."""
    return str(exc.status), exc.message, encode(exc.to_body())


def boundary(request_type: type[Req], handler: Callable[[Req], Awaitable[Any]], *, name: str):
    decoder = msgspec.json.Decoder(request_type)

    async def handle(request: Request) -> None:
        try:
            try:
                payload = decoder.decode(request.data or b"{}")
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise LamaError.from_validation(exc) from None
            result = await handler(payload)
            await request.respond(encode(result))
        except LamaError as exc:
            ERROR_COUNTS[f"{name}.{exc.code.value}"] += 1
            await _respond_error(request, exc)
        except Exception as exc:
            ERROR_COUNTS[f"{name}.internal"] += 1
            log.exception("endpoint %s failed", name)
            await _respond_error(request, LamaError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))

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


async def start_service(nc: Client, api_prefix: str, endpoints: list[Endpoint]) -> Service:
    service = await add_service(nc, name=SERVICE_NAME, version=SERVICE_VERSION,
                                description="lamabus: local LLM chat on NATS")
    for ep in endpoints:
        subject = f"{api_prefix}.{ep.group}.{ep.name}" if ep.group else f"{api_prefix}.{ep.name}"
        await service.add_endpoint(name=f"{ep.group}-{ep.name}" if ep.group else ep.name, subject=subject,
                                   handler=boundary(ep.request_type, ep.handler, name=subject))
    return service
