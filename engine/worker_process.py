"""The parent's side of one engine worker process: start it, send it commands, read its frames.

A :class:`WorkerProcess` runs ``engine.worker`` in a child Python, loads one model there, and
turns the frames the child writes (``engine.protocol``) into per-generation queues. When the
child dies, every generation it held ends with a :class:`WorkerDied` naming the signal, so the
:class:`~engine.runtime.Engine` can fail them cleanly and start a fresh worker for the next one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from engine.protocol import (
    Cancel,
    Check,
    Checked,
    Chunk,
    Done,
    Failed,
    FrameReader,
    Generate,
    Load,
    Loaded,
    LoadFailed,
    Shutdown,
    Started,
    Stats,
    command_encoder,
    decode_event,
    frame,
)
from engine.types import GenerateRequest, GenerationResult, KvCacheConfig, ModelConfig, TokenChunk
from wire.errors import ErrorCode, LamaError
from wire.params import SamplingParams

log = logging.getLogger("engine")

_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


def signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


class WorkerDied:
    """Queued for a generation whose worker died; ``acked`` says whether the worker had taken it on."""

    __slots__ = ("error", "acked")

    def __init__(self, error: LamaError, acked: bool) -> None:
        self.error = error
        self.acked = acked


#: The most text one merged chunk carries (characters): a reader far behind still gets a stream, not one blob.
MERGED_CHUNK_MAX = 4096

GenItem = TokenChunk | GenerationResult | LamaError | WorkerDied | None


class GenState:
    __slots__ = ("gid", "request_id", "queue", "started", "_held")

    def __init__(self, gid: int, request_id: str) -> None:
        self.gid = gid
        self.request_id = request_id
        # None: a Check passed
        self.queue: asyncio.Queue[GenItem] = asyncio.Queue()
        self.started: Started | None = None
        self._held: list[GenItem] = []  # taken off the queue while merging, not yet handed out

    async def next(self) -> GenItem:
        """The next item. A chunk comes together with the chunks of its channel already queued behind it:
        when the reader fell behind the engine (a fast GPU, a busy service), it publishes fewer, larger
        token messages and catches up, instead of paying its per-message cost for every token. Nothing
        waits for a merge and no text is lost or reordered; a reader that keeps up gets every chunk alone."""
        item = self._held.pop() if self._held else await self.queue.get()
        if not isinstance(item, TokenChunk) or self.queue.empty():
            return item
        parts, size = [item.text], len(item.text)
        while not self.queue.empty() and size < MERGED_CHUNK_MAX:
            following = self.queue.get_nowait()
            if not isinstance(following, TokenChunk) or following.channel != item.channel:
                self._held.append(following)
                break
            parts.append(following.text)
            size += len(following.text)
        return TokenChunk("".join(parts), item.channel) if len(parts) > 1 else item


class WorkerProcess:
    """One ``python -m engine.worker`` process and the tasks that read its pipes."""

    def __init__(
        self, python: str, config: ModelConfig, log_level: int, extra_env: dict[str, str],
        kv_cache: KvCacheConfig | None = None, token_batch_s: float = 0.0,
    ) -> None:
        self.python = python
        self.token_batch_s = token_batch_s
        self.extra_env = extra_env
        self.config = config
        self.log_level = log_level
        self.kv_cache = kv_cache
        self.proc: asyncio.subprocess.Process | None = None
        self.gens: dict[int, GenState] = {}
        self.next_gid = 1
        self.loaded: Loaded | None = None
        self.stats: Stats | None = None
        self.stderr_tail: deque[str] = deque(maxlen=60)
        self.dead = False
        self.closing = False
        self.loading = True
        self.returncode: int | None = None
        self._loaded_fut: asyncio.Future[Loaded] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[None]] = []
        self._exited = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self, timeout: float) -> Loaded:
        env = {**os.environ, **self.extra_env}
        env["PYTHONPATH"] = _PROJECT_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = await asyncio.create_subprocess_exec(
            self.python,
            "-m",
            "engine.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=_PROJECT_ROOT,
        )
        self._tasks = [
            asyncio.create_task(self._read_events(), name=f"engine-worker-{self.proc.pid}-events"),
            asyncio.create_task(self._read_stderr(), name=f"engine-worker-{self.proc.pid}-stderr"),
        ]
        self.send(Load(self.config, self.log_level, self.kv_cache, self.token_batch_s))
        try:
            loaded = await asyncio.wait_for(asyncio.shield(self._loaded_fut), timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise LamaError(
                ErrorCode.MODEL_LOAD_FAILED,
                f"loading {self.config.model_path} took longer than {timeout:.0f} s",
                path=self.config.model_path,
            ) from None
        except BaseException:
            await self.close()
            raise
        self.loading = False
        return loaded

    def send(self, cmd: msgspec.Struct) -> bool:
        proc = self.proc
        if self.dead or proc is None or proc.stdin is None or proc.stdin.is_closing():
            return False
        try:
            proc.stdin.write(frame(command_encoder, cmd))
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            return False
        return True

    def submit(self, request: GenerateRequest) -> GenState:
        return self._start(request.request_id, lambda gid: Generate(gid, request))

    def check(self, sampling: SamplingParams) -> GenState:
        return self._start("", lambda gid: Check(gid, sampling))

    def _start(self, request_id: str, command: Callable[[int], msgspec.Struct]) -> GenState:
        """A new generation id and its queue; when the command cannot be sent, the queue says why at once."""
        gid = self.next_gid
        self.next_gid += 1
        st = GenState(gid, request_id)
        self.gens[gid] = st
        if not self.send(command(gid)):
            del self.gens[gid]
            st.queue.put_nowait(WorkerDied(self._death_error(), False))
        return st

    def cancel(self, gid: int) -> bool:
        return gid in self.gens and self.send(Cancel(gid))

    def forget(self, gid: int) -> None:
        """The consumer went away: stop the generation and drop whatever still comes for it."""
        if self.gens.pop(gid, None) is not None:
            self.send(Cancel(gid))

    async def _read_events(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        reader = self.proc.stdout
        frames: FrameReader[Any] = FrameReader(decode_event)
        dispatch = self._dispatch
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                for ev in frames.feed(data):
                    dispatch(ev)
        except Exception as exc:  # a corrupt frame: treat the worker as broken
            log.error("engine worker %s: bad event stream: %r", self.pid, exc)
            if self.proc.returncode is None:
                self.proc.kill()
        self.returncode = await self.proc.wait()
        self._on_exit()

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for line in self.proc.stderr:
            text = line.decode("utf-8", errors="replace").rstrip()
            if text:
                self.stderr_tail.append(text)
                log.debug("worker %s: %s", self.pid, text)

    def _dispatch(self, ev: Any) -> None:
        if isinstance(ev, Chunk):
            st = self.gens.get(ev.gid)
            if st is not None:
                st.queue.put_nowait(TokenChunk(ev.text, ev.channel))  # type: ignore[arg-type]
        elif isinstance(ev, Done):
            st = self.gens.pop(ev.gid, None)
            if st is not None:
                st.queue.put_nowait(ev.result)
        elif isinstance(ev, Checked):
            st = self.gens.pop(ev.gid, None)
            if st is not None:
                st.queue.put_nowait(None)
        elif isinstance(ev, Started):
            st = self.gens.get(ev.gid)
            if st is not None:
                st.started = ev
        elif isinstance(ev, Failed):
            st = self.gens.pop(ev.gid, None)
            if st is not None:
                st.queue.put_nowait(LamaError(ev.code, ev.message, **ev.details))
        elif isinstance(ev, Stats):
            self.stats = ev
        elif isinstance(ev, Loaded):
            self.loaded = ev
            if not self._loaded_fut.done():
                self._loaded_fut.set_result(ev)
        elif isinstance(ev, LoadFailed):
            if not self._loaded_fut.done():
                self._loaded_fut.set_exception(LamaError(ev.code, ev.message, **ev.details))

    def _death_error(self) -> LamaError:
        how = signal_name(self.returncode)
        tail = " | ".join(list(self.stderr_tail)[-4:])
        detail = f"; last output: {tail}" if tail else ""
        if self.closing:
            return LamaError(ErrorCode.CANCELLED, "the model was released while generating")
        if self.loading:
            return LamaError(
                ErrorCode.MODEL_LOAD_FAILED,
                f"the llama worker (pid {self.pid}) died while loading {self.config.model_path} ({how}){detail}",
                path=self.config.model_path,
                exit=how,
            )
        return LamaError(
            ErrorCode.INTERNAL,
            f"the llama worker (pid {self.pid}) died during generation ({how}){detail}",
            exit=how,
        )

    def _on_exit(self) -> None:
        self.dead = True
        err = self._death_error()
        if not self._loaded_fut.done():
            self._loaded_fut.set_exception(err)
        for st in self.gens.values():
            st.queue.put_nowait(WorkerDied(err, st.started is not None))
        self.gens.clear()
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
        self._exited.set()
        if not self.closing:
            log.warning("engine worker %s for %s exited: %s", self.pid, self.config.model_path, err.message)

    async def close(self, timeout: float = 10.0) -> None:
        """Stop the worker (gracefully, then SIGKILL) and reap it. Idempotent."""
        if self.proc is None:
            return
        self.closing = True
        if not self.dead:
            self.send(Shutdown())
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self._exited.wait(), timeout)
            except asyncio.TimeoutError:
                if self.proc.returncode is None:
                    self.proc.kill()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._loaded_fut.done() and not self._loaded_fut.cancelled():
            self._loaded_fut.exception()  # retrieved, so asyncio does not warn about it
