"""The sides the bus benchmark measures (bench/bench_bus.py): lamabus over the bus, llama-cpp-python's
high-level API ("direct") and bench/baseline.py's raw llama.cpp loop ("raw"), each returning a
:class:`~bench.stats.Run` timed the same way (client-side clocks; see bench/bench_bus.py).

The bus side is a ``lamabus serve`` SUBPROCESS (:class:`ServiceProcess`) on an external broker,
so its CPU and memory are its own and its event loop does not share a GIL with the client, and
this process's :class:`BusSide`: one NATS connection, one wildcard subscription on
``<prefix>.topic.*.*`` that timestamps every ``generation.token`` and ``generation.completed``
as it arrives; messages are posted with :meth:`bus.client.LamabusClient.post` (JetStream
publish, waits for the PubAck).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.baseline import RawLlama
from bench.stats import Run
from bench.workload import PREFIX, SEED, SYSTEM_PROMPT
from bus.client import LamabusClient
from wire.api import Diagnostics, DiagnosticsGet, ModelActivate, ModelImport, ModelsList, ModelUpdate
from wire.errors import LamaError
from wire.messages import (
    ChatMessage,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    GenerationToken,
    MessageRejected,
    decode_topic_event,
)
from wire.params import GenerationParams, ModelParams

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------- the service


class ServiceProcess:
    """``python -m bus.cli serve`` on an external broker, in its own session."""

    def __init__(self, nats_url: str, data_dir: Path, log_path: Path, model_dir: str | None = None,
                 token_batch_ms: float | None = None) -> None:
        """``model_dir``: a directory the service may import models from (a GGUF other than the bundled one);
        ``token_batch_ms``: that setting (None: the service's default)."""
        self.nats_url = nats_url
        self.token_batch_ms = token_batch_ms
        self.data_dir = data_dir
        self.log_path = log_path
        self.model_dir = model_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wrapper: Sequence[str] = ()) -> None:
        """``wrapper``: a command line the service module runs under (a profiler), ending in ``-m``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "lamabus.toml"
        config.write_text(
            "[lamabus]\n"
            f'system_prompt = "{SYSTEM_PROMPT}"\n'
            'log_level = "warning"\n'
            "keep_alive = 0.0\n"
            "max_concurrent_topics = 8\n"
            # The peers do no background work; what a topic analysis costs a user is bench_analysis's measure.
            "analysis = false\n"
            + (f"model_dirs = [{json.dumps(self.model_dir)}]\n" if self.model_dir else "")
            + (f"token_batch_ms = {self.token_batch_ms}\n" if self.token_batch_ms is not None else "")
        )
        cmd = [*(wrapper or (sys.executable, "-m")), "bus.cli", "serve", "--nats-url", self.nats_url,
               "--data-dir", str(self.data_dir), "--config", str(config)]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"lamabus serve exited ({self.proc.returncode if self.proc else '?'}):\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------- the client side


class _Stream:
    __slots__ = ("completed", "done", "error", "messages", "t0", "t0_wall", "t_first", "t_last", "t_started")

    def __init__(self) -> None:
        self.t0 = 0.0
        self.t0_wall = 0.0
        self.t_started: float | None = None
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.messages = 0
        self.completed: GenerationCompleted | None = None
        self.error: str | None = None
        self.done = asyncio.Event()


class BusSide:
    """Posts chat messages and watches the replies stream back."""

    def __init__(self, nc: Any, prefix: str = PREFIX) -> None:
        self.nc = nc
        self.client = LamabusClient(nc, prefix=prefix)
        self.prefix = prefix
        self.pending: dict[str, _Stream] = {}
        self.sub: Any = None

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(f"{self.prefix}.topic.*.*", cb=self._on_msg)
        await self.nc.flush()

    async def _on_msg(self, msg: Any) -> None:
        t = time.perf_counter()
        subject = msg.subject
        if not subject.endswith((".tok", ".evt")):
            return
        try:
            ev = decode_topic_event(msg.data)
        except LamaError:
            return
        if isinstance(ev, GenerationToken):
            st = self.pending.get(ev.request_id)
            if st is not None and ev.channel == "content" and ev.text:
                if st.t_first is None:
                    st.t_first = t
                st.t_last = t
                st.messages += 1
        elif isinstance(ev, GenerationStarted):
            st = self.pending.get(ev.request_id)
            if st is not None and st.t_started is None:
                st.t_started = t
        elif isinstance(ev, GenerationCompleted):
            st = self.pending.get(ev.request_id)
            if st is not None:
                st.completed = ev
                st.done.set()
        elif isinstance(ev, (GenerationFailed, MessageRejected)):
            rid = ev.request_id if isinstance(ev, GenerationFailed) else ev.message_id
            st = self.pending.get(rid or "")
            if st is not None:
                st.error = f"{ev.error.code}: {ev.error.message}"
                st.done.set()

    async def ask(self, topic: str, text: str, params: GenerationParams, timeout: float = 600.0) -> Run:
        mid = uuid.uuid4().hex
        st = self.pending[mid] = _Stream()
        message = ChatMessage(id=mid, topic=topic, author_id="bench-user", text=text,
                              sent_at=datetime.now(timezone.utc), params=params)
        try:
            st.t0_wall = time.time()
            st.t0 = time.perf_counter()
            await self.client.post(message)
            async with asyncio.timeout(timeout):
                await st.done.wait()
        finally:
            del self.pending[mid]
        if st.error is not None or st.completed is None:
            raise RuntimeError(f"bus request in {topic} failed: {st.error}")
        c = st.completed
        t_first = st.t_first if st.t_first is not None else time.perf_counter()
        return Run(
            side="bus", ttft_s=t_first - st.t0, tokens=c.tokens, finish=c.finish_reason, t0=st.t0, t_first=t_first,
            t_last=st.t_last if st.t_last is not None else t_first, text=c.text,
            prompt_tokens=c.usage.prompt_tokens, cached_tokens=c.usage.cached_tokens,
            engine_tps=c.timing.tokens_per_second, engine_ttft_ms=c.timing.time_to_first_token,
            pre_engine_ms=c.timing.start_time - st.t0_wall * 1000.0, token_messages=st.messages,
            started_ms=(st.t_started - st.t0) * 1000.0 if st.t_started is not None else None,
        )

    async def diagnostics(self) -> Diagnostics:
        return await self.client.call(DiagnosticsGet(), timeout=10)


async def wait_ready(bus: BusSide, service: ServiceProcess, timeout: float = 120.0) -> None:
    """Until the service answers diagnostics (it has started and subscribed); fails if it exited."""
    deadline = time.monotonic() + timeout
    while True:
        service.check_alive()
        try:
            await bus.diagnostics()
            return
        except Exception:  # noqa: BLE001 - not up yet: any failure means "ask again"
            if time.monotonic() > deadline:
                raise RuntimeError("lamabus did not answer diagnostics in time:\n" + service.log_tail()) from None
            await asyncio.sleep(0.2)


async def use_model(bus: BusSide, model: str, gpu_layers: int, bundled: bool) -> str:
    """Make ``model`` the service's active model with ``gpu_layers`` stored on it; returns its id.

    The bundled model is registered by the service itself; any other GGUF is imported from the
    service's ``model_dirs`` (:class:`ServiceProcess` ``model_dir``)."""
    load = ModelParams(gpu_layers=gpu_layers)
    if bundled:
        models = await bus.client.call(ModelsList())
        model_id = next(m.id for m in models.models if m.active)
        await bus.client.call(ModelUpdate(model_id=model_id, load=load))
        return model_id
    reply = await bus.client.call(ModelImport(path=model, load=load), timeout=300)
    await bus.client.call(ModelActivate(model_id=reply.model.id))
    return reply.model.id


class DirectSide:
    """llama-cpp-python's high-level API, in this process."""

    def __init__(self, model: str, n_threads: int, n_ctx: int, n_batch: int, n_gpu_layers: int = 0) -> None:
        import llama_cpp

        self.n_threads = n_threads
        self.n_gpu_layers = n_gpu_layers
        self.llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                   n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, seed=SEED, verbose=False)

    def close(self) -> None:
        self.llm.close()

    def run(self, messages: list[dict[str, str]], n: int, *, reset: bool = True) -> Run:
        """``reset``: forget the KV cache first, so the whole prompt is evaluated (no prefix reuse)."""
        if reset:
            self.llm.reset()
        parts: list[str] = []
        finish = "stop"
        t_first: float | None = None
        t_last = 0.0
        chunks = 0
        t0 = time.perf_counter()
        for chunk in self.llm.create_chat_completion(messages=messages, max_tokens=n, temperature=0.0, stream=True,
                                                     stop=[], seed=SEED, repeat_penalty=1.0):
            choice = chunk["choices"][0]
            content = choice["delta"].get("content")
            if content:
                t_last = time.perf_counter()
                if t_first is None:
                    t_first = t_last
                chunks += 1
                parts.append(content)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
        if t_first is None:
            t_first = t_last = time.perf_counter()
        # Stopped by maxTokens: exactly n tokens were sampled (a chunk may hold several when UTF-8 is split).
        tokens = n if finish == "length" else chunks
        return Run(side="direct", ttft_s=t_first - t0, tokens=tokens, finish=finish, t0=t0, t_first=t_first,
                   t_last=t_last, text="".join(parts))


class RawSide:
    """bench/baseline.py's raw decode loop (one sequence) and its batched loop."""

    def __init__(self, model: str, n_threads: int, n_ctx: int, n_batch: int, n_seq_max: int,
                 n_gpu_layers: int = 0) -> None:
        self.single = RawLlama(model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, n_seq_max=1,
                               n_gpu_layers=n_gpu_layers)
        self.batched = (RawLlama(model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, n_seq_max=n_seq_max,
                                 n_gpu_layers=n_gpu_layers) if n_seq_max > 1 else None)

    def run(self, messages: list[dict[str, str]], n: int, *, engine_context: bool = False) -> Run:
        """``engine_context``: one sequence in the n_seq_max-sequence context the engine uses."""
        raw = self.batched if engine_context and self.batched is not None else self.single
        toks = raw.tokenize(raw.chat_prompt(messages))
        r = raw.run(toks, n)  # EOS ignored: always n tokens
        # RawLlama times from its own t0 (just before the first llama_decode); rebuild times on that origin.
        t_first = r["ttft_s"]
        t_last = t_first + ((n - 1) / r["tokens_per_s"] if r["tokens_per_s"] else 0.0)
        return Run(side="raw", ttft_s=r["ttft_s"], tokens=r["tokens"], finish="length", t0=0.0, t_first=t_first,
                   t_last=t_last, text=r["text"], prompt_tokens=len(toks), cached_tokens=0)

    def run_batched(self, conversations: list[list[dict[str, str]]], n: int) -> dict[str, Any]:
        assert self.batched is not None
        raw = self.batched
        return raw.run_batched([raw.tokenize(raw.chat_prompt(m)) for m in conversations], n)

    def close(self) -> None:
        self.single.close()
        if self.batched is not None:
            self.batched.close()
