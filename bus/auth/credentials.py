"""What a lamabus process presents to the broker: a ``.creds`` file, an nkey seed, a token, user and
password, TLS (CA, client certificate and key).

Secrets are read from a file or the environment (``LAMABUS_NATS_PASSWORD``, ``LAMABUS_NATS_TOKEN``),
held only here, and never put in a repr, a log line or an error message: :meth:`Credentials.describe`
says *which* setting supplied what, never the value.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from pathlib import Path
from typing import Any, Mapping

from bus.config import PASSWORD_ENV, TOKEN_ENV, Settings
from wire.errors import ErrorCode, LamaError


@dataclasses.dataclass(frozen=True, repr=False)
class Credentials:
    """How to log in; every field optional (none: an open broker). ``source`` names where they came from
    (a setting, an environment variable, the data directory), for error messages."""

    creds_file: str | None = None
    nkey_seed_file: str | None = None
    user: str | None = None
    password: str | None = dataclasses.field(default=None, compare=False)
    token: str | None = dataclasses.field(default=None, compare=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    inbox_prefix: str | None = None
    source: str = "settings"

    def __repr__(self) -> str:
        return f"Credentials({self.describe()})"

    __str__ = __repr__

    @property
    def empty(self) -> bool:
        return not (self.creds_file or self.nkey_seed_file or self.user or self.token or self.tls_ca or self.tls_cert)

    def describe(self) -> str:
        """Which credentials, without a secret: ``user 'admin' with a password (from the data directory)``."""
        parts = []
        if self.creds_file:
            parts.append(f"creds file {self.creds_file} (nats_creds)")
        if self.nkey_seed_file:
            parts.append(f"nkey seed file {self.nkey_seed_file} (nats_nkey)")
        if self.user:
            parts.append(f"user {self.user!r}" + (" with a password" if self.password else " without a password"))
        if self.token:
            parts.append("a token")
        if self.tls_cert:
            parts.append(f"client certificate {self.tls_cert} (nats_tls_cert)")
        if self.tls_ca:
            parts.append(f"CA {self.tls_ca} (nats_tls_ca)")
        if not parts:
            return "no credentials"
        return ", ".join(parts) + f" from {self.source}"

    def secrets(self) -> list[str]:
        """The secret values held (for redaction, and for tests that grep output for them)."""
        return [s for s in (self.password, self.token) if s]

    def ssl_context(self, url: str) -> ssl.SSLContext | None:
        """The TLS context: for a ``tls://`` URL, or whenever a CA or client certificate is set."""
        wants = any(u.strip().startswith("tls://") for u in url.split(","))
        if not (wants or self.tls_ca or self.tls_cert):
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=_readable(self.tls_ca, "nats_tls_ca"))
        if self.tls_cert:
            try:
                ctx.load_cert_chain(_readable(self.tls_cert, "nats_tls_cert"),
                                    _readable(self.tls_key, "nats_tls_key") if self.tls_key else None)
            except ssl.SSLError as exc:
                raise LamaError(ErrorCode.BAD_REQUEST, f"client certificate {self.tls_cert} or its key does not "
                                f"load ({exc.reason or 'bad file'}): check nats_tls_cert and nats_tls_key",
                                setting="nats_tls_cert") from None
        return ctx

    def connect_options(self, url: str) -> dict[str, Any]:
        """Keyword arguments for nats-py's ``Client.connect``."""
        opts: dict[str, Any] = {}
        if self.creds_file:
            opts["user_credentials"] = _readable(self.creds_file, "nats_creds")
        if self.nkey_seed_file:
            opts["nkeys_seed"] = _readable(self.nkey_seed_file, "nats_nkey")
        if self.user:
            opts["user"] = self.user
            opts["password"] = self.password or ""
        if self.token:
            opts["token"] = self.token
        if self.inbox_prefix:
            opts["inbox_prefix"] = self.inbox_prefix
        if (ctx := self.ssl_context(url)) is not None:
            opts["tls"] = ctx
        return opts


def _readable(path: str | None, setting: str) -> str:
    if path is None or not os.access(path, os.R_OK) or not os.path.isfile(path):
        raise LamaError(ErrorCode.BAD_REQUEST, f"{setting}: cannot read {path}", setting=setting, path=str(path))
    return path


def _secret_file(path: str, setting: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        raise LamaError(ErrorCode.BAD_REQUEST, f"{setting}: cannot read {path}", setting=setting,
                        path=path) from None
    if not value:
        raise LamaError(ErrorCode.BAD_REQUEST, f"{setting}: {path} is empty", setting=setting, path=path)
    return value


def from_settings(settings: Settings, environ: Mapping[str, str] | None = None) -> Credentials:
    """The credentials the settings name (flags, environment, TOML file); secrets read now."""
    environ = os.environ if environ is None else environ
    password = None
    if settings.nats_password_file:
        password = _secret_file(settings.nats_password_file, "nats_password_file")
    elif environ.get(PASSWORD_ENV):
        password = environ[PASSWORD_ENV]
    token = None
    if settings.nats_token_file:
        token = _secret_file(settings.nats_token_file, "nats_token_file")
    elif environ.get(TOKEN_ENV):
        token = environ[TOKEN_ENV]
    if password and not settings.nats_user:
        raise LamaError(ErrorCode.BAD_REQUEST, "a NATS password is set but no user (nats_user, --nats-user)",
                        setting="nats_user")
    return Credentials(creds_file=settings.nats_creds, nkey_seed_file=settings.nats_nkey, user=settings.nats_user,
                       password=password, token=token, tls_ca=settings.nats_tls_ca, tls_cert=settings.nats_tls_cert,
                       tls_key=settings.nats_tls_key)
