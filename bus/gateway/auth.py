"""API keys: ``Authorization: Bearer <key>`` -> a role, and what each role may do.

Keys come from a file (``openai_keys_file``) and/or the environment variable
``LAMABUS_OPENAI_KEYS`` (bus/config.py names it), never from a flag or the TOML
file, so they stay out of the process list and of ``Settings``. Both hold entries
``<role>:<key>``, one per line or comma-separated; ``#`` starts a comment line.

Only SHA-256 digests of the keys are kept, and a presented key is compared by digest
in constant time: the keys themselves are never logged, put in an error, or kept in
memory past loading.

The roles are those of the bus (bus/auth/roles.py), and what a key may do is what
:func:`bus.auth.roles.grant` says its role may do: ``chat`` may list models and chat
(``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``: a topic's ``post``),
nothing else; ``admin`` may also remove a model (``DELETE /v1/models/{id}``:
``models.remove``). The gateway itself logs in to the broker as admin (or as its
settings say) and acts for its callers only after this check.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path
from typing import Literal, Mapping

from bus.auth.roles import grant
from bus.config import OPENAI_KEYS_ENV
from bus.gateway.errors import OpenAIError
from wire.errors import ErrorCode, LamaError

Role = Literal["chat", "admin"]
ROLES: tuple[Role, ...] = ("chat", "admin")
"""The roles a key may have (``service`` is a lamabus node's own, never a caller's)."""

#: The gateway's operations as bus/auth/roles.py names them: an endpoint of the API, or a topic action
#: (chatting through the gateway is what posting in a topic is on the bus).
OPERATIONS: dict[str, tuple[Literal["endpoint", "action"], str]] = {
    "models.list": ("endpoint", "models.list"),
    "models.remove": ("endpoint", "models.remove"),
    "chat": ("action", "post"),
    "completions": ("action", "post"),
}

_KEY = re.compile(r"^[\x21-\x7e]{8,512}$")  # printable ASCII without spaces; at least 8 characters


def may(role: Role, operation: str) -> bool:
    """Whether a key of ``role`` may perform the gateway operation ``operation`` (a key of :data:`OPERATIONS`)."""
    kind, name = OPERATIONS[operation]
    allowed = grant(role)
    return allowed.may_call(name) if kind == "endpoint" else allowed.may(name)  # type: ignore[arg-type]


class Keys:
    """Digest -> role. Empty: no keys configured (the gateway then listens on loopback only)."""

    def __init__(self, digests: Mapping[bytes, Role] | None = None) -> None:
        self._digests = dict(digests or {})

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:  # never the digests either
        return f"Keys({len(self._digests)} keys)"

    @classmethod
    def parse(cls, text: str, *, source: str) -> "Keys":
        """Entries ``role:key``; a bad entry is a ``bad_request`` naming ``source`` and the entry's number,
        never its key."""
        digests: dict[bytes, Role] = {}
        entries = [e.strip() for line in text.splitlines() if not line.lstrip().startswith("#")
                   for e in line.split(",")]
        for n, entry in enumerate((e for e in entries if e), start=1):
            role, sep, key = entry.partition(":")
            if not sep or role not in ROLES:
                raise LamaError(ErrorCode.BAD_REQUEST, f"{source}: entry {n} must be <role>:<key> with role one of "
                                f"{', '.join(ROLES)}", source=source, entry=n)
            if not _KEY.match(key):
                raise LamaError(ErrorCode.BAD_REQUEST, f"{source}: the key of entry {n} must be 8 to 512 printable "
                                "characters without spaces", source=source, entry=n)
            digests[_digest(key)] = role  # type: ignore[assignment]
        return cls(digests)

    @classmethod
    def load(cls, path: str | None, environ: Mapping[str, str] | None = None) -> "Keys":
        environ = os.environ if environ is None else environ
        keys: dict[bytes, Role] = {}
        if path:
            try:
                text = Path(path).expanduser().read_text()
            except OSError as exc:
                raise LamaError(ErrorCode.BAD_REQUEST, f"openai_keys_file {path}: {exc.strerror or exc}",
                                path=str(path)) from None
            keys.update(cls.parse(text, source=f"openai_keys_file {path}")._digests)
        if value := environ.get(OPENAI_KEYS_ENV):
            keys.update(cls.parse(value, source=OPENAI_KEYS_ENV)._digests)
        return cls(keys)

    def role_of(self, authorization: str | None) -> Role | None:
        """The role of the request's bearer key; None when no keys are configured (everything is allowed)."""
        if not self._digests:
            return None
        if not authorization:
            raise OpenAIError(401, "no API key: send Authorization: Bearer <key>", code="missing_api_key",
                              type="invalid_request_error")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise OpenAIError(401, "the Authorization header must be Bearer <key>", code="invalid_api_key",
                              type="invalid_request_error")
        digest = _digest(key.strip())
        for known, role in self._digests.items():
            if hmac.compare_digest(known, digest):
                return role
        raise OpenAIError(401, "incorrect API key provided", code="invalid_api_key", type="invalid_request_error")

    def check(self, authorization: str | None, operation: str) -> str | None:
        """Refuse what the key may not do; else the key's quota author (None: no keys configured).

        The author is the key, not the body's ``user``: a key's holder chooses ``user`` freely, so limits
        keyed by it could be dodged. It names the key by a prefix of its digest, never the key."""
        role = self.role_of(authorization)
        if role is None:
            return None
        if not may(role, operation):
            raise OpenAIError(403, f"a {role} key may not {operation.replace('.', ' ')}", code="forbidden",
                              type="permission_error")
        _, _, key = (authorization or "").strip().partition(" ")
        return f"openai-key-{_digest(key.strip()).hex()[:16]}"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
