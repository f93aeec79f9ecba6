"""One error root for the whole service, with a stable string code.

Every failure that crosses a layer boundary is a :class:`LamaError`. The code is
part of the wire contract (DESIGN.md, "Error codes"); the status is what the
NATS micro error header ``Nats-Service-Error-Code`` carries.
"""

from __future__ import annotations

import enum
import re
from typing import Any

import msgspec


_FIELD_IN_MESSAGE = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]+)`(?: - at `([^`]+)`)?")


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    MODEL_FILE_MISSING = "model_file_missing"
    MODEL_INVALID = "model_invalid"
    MODEL_LOAD_FAILED = "model_load_failed"
    OUT_OF_MEMORY = "out_of_memory"
    CONTEXT_OVERFLOW = "context_overflow"
    CONFLICT = "conflict"
    BUSY = "busy"
    #: Quotas (issue 20): an author over ``messagesPerMinute`` (retryable after ``details.retryAfterMs``) ...
    RATE_LIMITED = "rate_limited"
    #: ... with too many requests waiting or running (retryable once one has finished) ...
    TOO_MANY_RUNNING = "too_many_running"
    #: ... a prompt above the service's cap in characters ...
    PROMPT_TOO_LARGE = "prompt_too_large"
    #: ... or a maxTokens above the cap, where the operator chose to refuse rather than clamp.
    MAX_TOKENS_EXCEEDED = "max_tokens_exceeded"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    #: The broker refused the login (wrong password, expired or revoked credential, untrusted certificate).
    UNAUTHORIZED = "unauthorized"
    #: The broker refused a publish or subscription this login has no permission for (docs/security.md).
    FORBIDDEN = "forbidden"

    @property
    def status(self) -> int:
        return _STATUS[self]


_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.MODEL_FILE_MISSING: 404,
    ErrorCode.MODEL_INVALID: 400,
    ErrorCode.MODEL_LOAD_FAILED: 500,
    ErrorCode.OUT_OF_MEMORY: 503,
    ErrorCode.CONTEXT_OVERFLOW: 400,
    ErrorCode.CONFLICT: 409,
    ErrorCode.BUSY: 429,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.TOO_MANY_RUNNING: 429,
    ErrorCode.PROMPT_TOO_LARGE: 400,
    ErrorCode.MAX_TOKENS_EXCEEDED: 400,
    ErrorCode.CANCELLED: 409,
    ErrorCode.TIMEOUT: 503,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
}


class ErrorBody(msgspec.Struct, frozen=True, rename="camel"):
    """The JSON body of every error reply and the ``error`` field of failure events."""

    code: ErrorCode
    message: str
    details: dict[str, Any] | None = None


class LamaError(Exception):
    """The root of every error lamabus raises on purpose.

    ``details`` holds structured fields (the offending field path, a model id,
    an expected version) so that callers never have to parse ``message``.
    """

    def __init__(self, code: ErrorCode | str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.details = details

    @property
    def status(self) -> int:
        return self.code.status

    def to_body(self) -> ErrorBody:
        return ErrorBody(self.code, self.message, self.details or None)

    @classmethod
    def from_body(cls, body: ErrorBody) -> "LamaError":
        return cls(body.code, body.message, **(body.details or {}))

    @classmethod
    def from_validation(cls, exc: msgspec.ValidationError | msgspec.DecodeError) -> "LamaError":
        """``bad_request`` whose ``details.field`` is the JSON path of the offending field, where there is one."""
        message = str(exc)
        path = None
        # msgspec names a missing or unknown field in the message, and its parent in "at `$...`".
        if m := _FIELD_IN_MESSAGE.match(message):
            path = f"{m.group(2) or '$'}.{m.group(1)}"
        elif "at `" in message:
            path = message.rsplit("at `", 1)[1].rstrip("`")
        return cls(ErrorCode.BAD_REQUEST, message, **({"field": path} if path else {}))

    def __repr__(self) -> str:
        return f"LamaError({self.code.value!r}, {self.message!r})"


def stream_conflict(stream_id: str, expected: int | None, actual: int) -> LamaError:
    """The optimistic-concurrency refusal: ``stream_id`` moved on from the version the caller decided on."""
    return LamaError(
        ErrorCode.CONFLICT,
        f"stream {stream_id} is at version {actual}, expected {expected}",
        stream_id=stream_id, expected=expected, actual=actual,
    )
