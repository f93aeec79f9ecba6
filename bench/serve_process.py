"""``lamabus serve`` as a child process: start, wait until ready, SIGTERM, kill -9, start again.

One harness for the fault tests (tests/test_faults.py) and the soak (bench/soak.py).
The child runs in its own process group (``start_new_session``), so nothing it starts
can outlive :meth:`ServeProcess.aclose`, and with its stderr read line by line: "lamabus
ready" says it is ready, and tracebacks and ERROR lines are counted.

The two callers want different things when the service misbehaves, and say which with
``strict``:

* ``strict=True`` (the tests): a serve that ignores SIGTERM, or whose stderr stays open
  after it died (an orphaned engine worker holds it), is an error, raised at once;
* ``strict=False`` (the soak): both are reaped (the process group SIGKILLed) and the run
  goes on; the soak judges the service by what it answered, not by how it died.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: stderr lines kept for :meth:`ServeProcess.log_tail` (across restarts: a crash's last words stay).
_KEPT_LINES = 1000


class ServeError(RuntimeError):
    """The service did not get ready, ignored SIGTERM, or left its stderr open after it died."""


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


class ServeProcess:
    """``python -m bus.cli serve --nats-url URL --data-dir DIR --config FILE``, started with the
    environment's ``LAMABUS_*`` variables removed (the config file says everything)."""

    def __init__(self, nats_url: str, data_dir: Path, config: Path, *, strict: bool) -> None:
        self.args = [sys.executable, "-m", "bus.cli", "serve", "--nats-url", nats_url, "--data-dir", str(data_dir),
                     "--config", str(config)]
        self.strict = strict
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=_KEPT_LINES)
        self.tracebacks = 0
        self.errors = 0
        self._ready = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 60.0) -> float:
        """Start and wait for "lamabus ready"; returns the seconds it took."""
        began = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAMABUS_")}
        self._ready = asyncio.Event()
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        self._reader = asyncio.create_task(self._read(self.proc))
        ready = asyncio.create_task(self._ready.wait())
        exited = asyncio.create_task(self.proc.wait())
        try:
            await asyncio.wait({ready, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        if not self._ready.is_set():
            raise ServeError("lamabus serve did not get ready:\n" + self.log_tail())
        return time.monotonic() - began

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self.lines.append(text)
            if "Traceback" in text:
                self.tracebacks += 1
            if " ERROR " in text or text.startswith("ERROR"):
                self.errors += 1
            if "lamabus ready" in text:
                self._ready.set()

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(list(self.lines)[-n:])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait(self) -> int:
        """Until the service exits (by itself or not); its exit status."""
        assert self.proc is not None
        return await self.proc.wait()

    async def kill(self) -> int:
        """kill -9 the service process alone (what a crash looks like); its engine worker must follow
        by itself. Returns the exit status (``-SIGKILL``). Lenient: then waits up to 15 s for the
        process group to empty, and goes on either way."""
        assert self.proc is not None
        pid = self.proc.pid
        self.proc.send_signal(signal.SIGKILL)
        code = await self.proc.wait()
        await self._finish_reader()
        if not self.strict:
            deadline = time.monotonic() + 15
            while group_members(pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        return code

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait: a graceful shutdown; the exit status (None: never started).

        Past ``timeout`` the service is SIGKILLed; strict, that is a :class:`ServeError`.
        Lenient, the whole process group is reaped afterwards whatever happened.
        """
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                if self.strict:
                    self.proc.kill()
                    await self.proc.wait()
                    raise ServeError("lamabus serve ignored SIGTERM:\n" + self.log_tail()) from None
        if self.strict:
            await self._finish_reader()
        else:
            await self.aclose()
        return self.proc.returncode

    async def _finish_reader(self) -> None:
        """Read stderr to its end: it closes when the service and every child it started are gone."""
        reader, self._reader = self._reader, None
        if reader is None:
            return
        # asyncio.wait: neither the reader's end nor a timeout raises here; a cancellation of the caller does.
        done, _ = await asyncio.wait({reader}, timeout=10 if self.strict else 15)
        if not done:
            reader.cancel()
            if self.strict:
                raise ServeError("lamabus serve's stderr stayed open after it exited (an orphaned child?):\n"
                                 + self.log_tail())

    async def aclose(self) -> None:
        """Reap everything this started, whatever state it is in."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
