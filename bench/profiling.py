"""Where the service's time goes when the bus benchmark misses a target: py-spy on the service and its
engine worker while the bus generates (or, without py-spy, pyinstrument on the service alone), and
py-spy's collapsed stacks summed into the report's top functions.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.bus_results import Profile, ProfileSummary
from bench.sampling import process_tree
from bench.sides import BusSide, ServiceProcess, wait_ready
from bench.workload import BusBenchConfig, essay, greedy

ROOT = Path(__file__).resolve().parent.parent


async def profile(cfg: BusBenchConfig, bus: BusSide, service: ServiceProcess, work: Path,
                  missed: list[str]) -> Profile:
    """Profile the service while it answers, when ``cfg.profile`` says so (``auto``: when a target was missed)."""
    want = cfg.profile == "on" or (cfg.profile == "auto" and missed)
    reason = ("missed: " + ", ".join(missed)) if missed else "requested"
    if not want:
        return Profile(taken=False, reason="all bus targets met" if not missed else "profiling off")
    spy = py_spy()
    if spy is None:
        return await _with_pyinstrument(cfg, bus, service, work, reason)
    tree = process_tree(service.pid)
    secs = max(2, int(cfg.profile_seconds))
    outs = {"service": work / "service.prof", "engine_worker": work / "worker.prof"}
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
    k = max(cfg.concurrency) if "batched8_over" in reason else 1
    i = 0
    while time.monotonic() < deadline - 0.5:
        await bus.ask(f"profile-{i}", essay(f"p{i}"), greedy(cfg.tokens))
        i += 1
        if k > 1 and time.monotonic() < deadline - 0.5:  # the batched target was missed: profile a batch too
            await asyncio.gather(*(bus.ask(f"profile-{i}-{j}", essay(f"p{i}-{j}"), greedy(cfg.tokens))
                                   for j in range(k)))
            i += k
    errors = []
    for p in procs:
        _, err = await p.communicate()
        if p.returncode:
            errors.append(err.decode(errors="replace").strip()[-300:])
    summaries = {role: summarize_profile(path.read_text(errors="replace")) for role, path in outs.items()
                 if path.exists()}
    result = Profile(tool="py-spy record (service: --nonblocking; engine worker: --native)", seconds=secs,
                     requests=i, taken=True, reason=reason, **summaries)
    if errors:
        result.errors = errors
    return result


async def _with_pyinstrument(cfg: BusBenchConfig, bus: BusSide, service: ServiceProcess, work: Path,
                             reason: str) -> Profile:
    """Without py-spy: restart the service under pyinstrument (service side only; the worker is not seen)."""
    secs = max(2.0, cfg.profile_seconds)
    out = work / "service-pyinstrument.txt"
    service.stop()
    service.start(wrapper=(sys.executable, "-m", "pyinstrument", "--renderer", "text", "--no-color",
                           "--outfile", str(out), "-m"))
    await wait_ready(bus, service)
    await bus.ask("profile-warm", "Say hello.", greedy(8))
    deadline = time.monotonic() + secs
    i = 0
    while time.monotonic() < deadline:
        await bus.ask(f"profile-{i}", essay(f"p{i}"), greedy(cfg.tokens))
        i += 1
    service.stop()  # SIGTERM: the service shuts down and pyinstrument writes its report
    text = out.read_text(errors="replace") if out.exists() else ""
    return Profile(tool="pyinstrument (service process only; install py-spy to see the engine worker too)",
                   seconds=secs, requests=i, taken=bool(text), reason=reason, service_text=text.splitlines()[:80])


# ---------------------------------------------------------------------------- py-spy's stacks


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


def summarize_profile(raw: str, top: int = 12) -> ProfileSummary:
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
        return ProfileSummary(samples=0, waiting_samples=waiting, self=[], inclusive=[])

    def rows(c: Counter[str], skip_over: float) -> list[list[Any]]:
        return [[name, round(100.0 * n / total, 1)] for name, n in c.most_common() if n / total <= skip_over][:top]

    # Inclusive: leave out the frames nearly every sample passes through (main, the event loop's run).
    return ProfileSummary(samples=total, waiting_samples=waiting, self=rows(self_c, 1.01),
                          inclusive=rows(incl, 0.8), by_kind=rows(kinds, 1.01))


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

