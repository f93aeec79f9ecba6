"""What the machine is and what the service's processes use, read from /proc while the bench runs.

:class:`RssSampler` samples VmRSS summed over the service's process tree (the service and
its engine workers) in a thread, keeping the peak per labelled phase; :class:`CpuMeter`
adds up the CPU seconds each party (service, engine worker, nats-server, client) spent
while the bus generated; :func:`machine_info` describes the machine for the report.
"""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from collections import Counter
from collections.abc import Iterator

from bench.bus_results import Machine, RssSplit

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

    def split_mb(self, label: str) -> RssSplit | None:
        kb = self.split_kb.get(label)
        return RssSplit(service=kb[0] / 1024, engine_workers=kb[1] / 1024) if kb else None


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



# ---------------------------------------------------------------------------- machine


def machine_info() -> Machine:
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

    return Machine(
        cpu=cpu,
        logical_cpus=os.cpu_count(),
        usable_cpus=usable,
        physical_cores=_physical_cores(),
        simd=sorted(f for f in flags if f in {"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_int8"}),
        memory_gb=round(mem_kb / 2**20, 1),
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        llama_cpp_python=getattr(llama_cpp, "__version__", "?"),
        llama_system_info=(llama_cpp.llama_print_system_info() or b"").decode(errors="replace").strip(),
        virtualised=_hypervisor(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
    )


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

