"""Errors in OpenAI's shape: ``{"error": {"message", "type", "code", "param"}}`` with OpenAI's status codes.

Every failure the gateway answers is an :class:`OpenAIError`; a lamabus :class:`LamaError`
(from the bus, or from decoding the body) is translated once, in :func:`from_lama`, so the
status, the ``type`` and the field named in ``param`` follow one table. The official clients
pick their exception class by status (400 ``BadRequestError``, 401 ``AuthenticationError``,
403 ``PermissionDeniedError``, 404 ``NotFoundError``, 429 ``RateLimitError``, 5xx
``InternalServerError``).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from wire.errors import ErrorCode, LamaError

#: OpenAI's ``error.type`` for a status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error"}

#: lamabus's wire field (camelCase, under ``params``) -> the OpenAI request field that set it.
_FIELDS = {"maxTokens": "max_tokens", "temperature": "temperature", "topP": "top_p", "topK": "top_k",
           "stop": "stop", "seed": "seed", "jsonSchema": "response_format", "grammar": "grammar",
           "messages": "messages", "prompt": "prompt", "handle": "model", "modelId": "model"}

_RETRY_AFTER_DEFAULT = 1


class OpenAIError(Exception):
    """One error reply: ``status`` and the body's fields; ``retry_after`` (seconds) goes out as ``Retry-After``."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def encode(self) -> bytes:
        return msgspec.json.encode(self.body())

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def __repr__(self) -> str:
        return f"OpenAIError({self.status}, {self.message!r}, code={self.code!r}, param={self.param!r})"


def bad_request(message: str, param: str | None, code: str = "invalid_request") -> OpenAIError:
    return OpenAIError(400, message, code=code, param=param)


def unsupported(param: str, what: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {what} is not supported by lamabus (docs/openai.md)", code="unsupported",
                       param=param)


_PATH_TOKEN = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def param_of(field: str | None, *, wire: bool = False) -> str | None:
    """A msgspec JSON path (``$.messages[0].role``) as OpenAI names it (``messages[0].role``).

    ``wire``: the path is of a lamabus request (``$.params.maxTokens``, ``params.jsonSchema``): name the
    OpenAI field that set it instead."""
    if not field:
        return None
    path = field.removeprefix("$").lstrip(".")
    if not wire:
        return path or None
    for name in (m.group(1) for m in _PATH_TOKEN.finditer("." + path) if m.group(1)):
        if name in _FIELDS:
            return _FIELDS[name]
    return None


def from_lama(exc: LamaError, *, wire: bool = True) -> OpenAIError:
    """The OpenAI error for a lamabus error. ``wire``: it came from the bus (its field paths are lamabus's);
    else from decoding the OpenAI body (its paths are already OpenAI's)."""
    details = exc.details or {}
    param = param_of(details.get("field") if isinstance(details.get("field"), str) else None, wire=wire)
    code = exc.code
    if code in (ErrorCode.MODEL_NOT_FOUND, ErrorCode.MODEL_FILE_MISSING):
        return OpenAIError(404, exc.message, code="model_not_found", param="model")
    if code is ErrorCode.NOT_FOUND and details.get("node"):
        # The node that held the model stopped (or is not serving): nothing the caller did wrong.
        return OpenAIError(503, exc.message, code="node_unavailable", retry_after=_RETRY_AFTER_DEFAULT)
    if code is ErrorCode.BUSY or exc.status == 429:
        return OpenAIError(429, exc.message, code=code.value if code is not ErrorCode.BUSY else "busy",
                           retry_after=_retry_after(details))
    if code in (ErrorCode.OUT_OF_MEMORY, ErrorCode.MODEL_LOAD_FAILED, ErrorCode.TIMEOUT):
        return OpenAIError(503, exc.message, code=code.value, retry_after=_RETRY_AFTER_DEFAULT)
    if code is ErrorCode.CANCELLED:
        return OpenAIError(503, exc.message, code="cancelled", retry_after=_RETRY_AFTER_DEFAULT)
    if code is ErrorCode.INTERNAL:
        return OpenAIError(500, exc.message, code="internal")
    status = exc.status if 400 <= exc.status < 600 else 500
    return OpenAIError(status, exc.message, code=code.value, param=param)


def _retry_after(details: dict[str, Any]) -> int:
    """Whole seconds from ``retryAfterMs``/``retry_after_ms`` when the service said, else 1."""
    for key in ("retryAfterMs", "retry_after_ms"):
        value = details.get(key)
        if isinstance(value, (int, float)) and value >= 0:
            return max(1, -(-int(value) // 1000))
    return _RETRY_AFTER_DEFAULT
