"""The embedded broker's users: one per role, with generated passwords kept in the data directory.

On first start ``<data-dir>/auth/secrets.json`` (directory 0700, file 0600) gets a random password per
role; later starts reuse it, so a CLI or a page token keeps working across restarts. The server config
gets the three users with the permissions of :mod:`bus.auth.roles`; only ``chat`` may connect over
WebSocket (the page), so a browser can never log in as admin or service. lamabus's own CLI reads the
admin password from the same file when it talks to the embedded broker (:func:`local_admin`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from pathlib import Path
from typing import Mapping

from bus.auth.credentials import Credentials, from_settings
from bus.auth.roles import ROLES, Role, permissions
from bus.config import Settings
from wire.errors import ErrorCode, LamaError

#: The embedded broker's user name for each role.
USERS: Mapping[Role, str] = {"service": "lamabus-service", "admin": "lamabus-admin", "chat": "chat"}
#: Which of the broker's listeners each role may log in on (``WEBSOCKET``: the page).
CONNECTION_TYPES: Mapping[Role, tuple[str, ...]] = {
    "service": ("STANDARD",), "admin": ("STANDARD",), "chat": ("STANDARD", "WEBSOCKET")}


def auth_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "auth"


def secrets_path(data_dir: str | os.PathLike[str]) -> Path:
    return auth_dir(data_dir) / "secrets.json"


@dataclasses.dataclass(frozen=True, repr=False)
class EmbeddedAuth:
    """The three users of the embedded broker and their passwords. Never printed (repr names no secret)."""

    path: Path
    passwords: Mapping[Role, str]

    def __repr__(self) -> str:
        return f"EmbeddedAuth({self.path})"

    def credentials(self, role: Role) -> Credentials:
        return Credentials(user=USERS[role], password=self.passwords[role], source=f"{self.path} ({role})")

    @property
    def page_token(self) -> str:
        """What the page logs in with (the chat user's password), handed out as ``#token=`` in its address."""
        return self.passwords["chat"]

    def server_config(self, prefix: str) -> str:
        """The nats-server ``authorization`` block (JSON values, which the config format accepts)."""
        users = []
        for role in ROLES:
            users.append({"user": USERS[role], "password": self.passwords[role],
                          "permissions": permissions(role, prefix=prefix).server_config(),
                          "allowed_connection_types": list(CONNECTION_TYPES[role])})
        return "authorization {\n  users = " + json.dumps(users, indent=2) + "\n}\n"


def _valid(data: object) -> dict[Role, str] | None:
    if not isinstance(data, dict):
        return None
    found = {role: data.get(role) for role in ROLES}
    if all(isinstance(v, str) and len(v) >= 16 for v in found.values()):
        return found  # type: ignore[return-value]
    return None


def load(data_dir: str | os.PathLike[str]) -> EmbeddedAuth | None:
    """The stored users, or None when the data directory has none (or an unreadable file)."""
    path = secrets_path(data_dir)
    try:
        passwords = _valid(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None
    return EmbeddedAuth(path, passwords) if passwords else None


def load_or_create(data_dir: str | os.PathLike[str]) -> EmbeddedAuth:
    """The stored users; on first start new passwords, written 0600 in a 0700 directory."""
    found = load(data_dir)
    if found is not None:
        _tighten(found.path)
        return found
    directory = auth_dir(data_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    path = secrets_path(data_dir)
    if path.exists():
        raise LamaError(ErrorCode.BAD_REQUEST, f"{path} is not a lamabus secrets file: move it away, and a new "
                        "one is made on the next start", path=str(path))
    passwords = {role: secrets.token_urlsafe(24) for role in ROLES}
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(passwords, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return EmbeddedAuth(path, passwords)


def _tighten(path: Path) -> None:
    """Keep the modes 0600/0700 even if someone loosened them (the file holds every role's password)."""
    try:
        os.chmod(path, 0o600)
        os.chmod(path.parent, 0o700)
    except OSError:
        pass


def local_admin(data_dir: str | os.PathLike[str]) -> Credentials | None:
    """The admin credentials of the embedded broker run from ``data_dir`` (the CLI's default login)."""
    found = load(data_dir)
    return found.credentials("admin") if found is not None else None


def client_login(settings: Settings) -> tuple[str, Credentials]:
    """Where a client command connects and as whom: the configured broker and credentials, else the local
    embedded broker (``<data-dir>/nats.url``) as its admin (``<data-dir>/auth/secrets.json``), so
    ``lamabus serve`` + ``lamabus chat demo`` work with no set-up."""
    credentials = from_settings(settings)
    if credentials.empty and (not settings.nats_url or settings.nats_url == _local_url(settings)):
        # Also for ``--nats-url`` naming the local embedded broker itself (its URL from nats.url).
        credentials = local_admin(settings.data_path) or credentials
    return settings.client_url(), credentials


def _local_url(settings: Settings) -> str | None:
    try:
        return settings.embedded_url_file.read_text().strip() or None
    except OSError:
        return None
