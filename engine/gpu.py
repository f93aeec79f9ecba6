"""What GPU llama.cpp can use here, and how much of its memory is free. No llama import at module level.

Two sides:

* the PARENT (:class:`engine.runtime.Engine`) asks :func:`probe` before a load that may offload: a short
  ``python -m engine.gpu`` child imports llama-cpp-python, lists ggml's backend devices with their
  total and free memory (``ggml_backend_dev_memory``: ``cudaMemGetInfo`` on CUDA) and prints one JSON
  line. A child, because a GPU driver that aborts or hangs in its init must not take the service down,
  and because only the engine worker may import llama.cpp in the service's process tree. On a build
  with no GPU backend library beside ``libllama`` (the CPU wheel ./install.sh builds by default) no
  child is started: the answer is "no GPU backend" at once.
* the WORKER (engine/binding.py) calls :func:`devices` with its loaded ``llama_cpp`` module to measure
  the device memory before and after its load, and :func:`buffer_sizes` reads llama.cpp's own
  "<buffer> model/KV/compute buffer size = N MiB" log lines: what the model really took where.

When ggml's device API cannot be reached (an older or stripped build), ``nvidia-smi`` answers for free
VRAM if it exists.

``LAMABUS_GPU_FAULT`` (a test hook, comma-separated; see docs/operations.md "GPU"): ``fake:FREE_MIB[:TOTAL_MIB]``
makes the probe report one fake GPU with that much memory, ``probe-crash`` makes the probe child abort,
``load-fail`` makes the worker's first load with GPU layers fail as an out-of-VRAM allocation would.
Each lets a CPU-only machine walk a GPU path: planning, the fallback, the log line, diagnostics.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

FAULT_ENV = "LAMABUS_GPU_FAULT"
# ggml_backend_dev_type: CPU, GPU, IGPU (integrated, shares host memory), ACCEL (BLAS, AMX: not offload targets)
_DEV_CPU, _DEV_GPU, _DEV_IGPU, _DEV_ACCEL = 0, 1, 2, 3
# Backend libraries that make offloading possible (llama.cpp builds each as libggml-<name>.so).
_GPU_LIBS = ("cuda", "hip", "vulkan", "metal", "sycl", "musa", "opencl", "cann", "rpc", "webgpu", "zdnn")
PROBE_TIMEOUT = 60.0  # a CUDA init on a big machine takes seconds; a hung driver must not hang a load


class GpuDevice(msgspec.Struct, frozen=True, rename="camel"):
    name: str  # ggml's device name (CUDA0)
    description: str  # the product (NVIDIA H200)
    total_bytes: int
    free_bytes: int
    integrated: bool = False


class GpuProbe(msgspec.Struct, frozen=True, rename="camel"):
    """What the parent plans a load with. ``devices`` empty: no offload; ``reason`` says why."""

    backend: bool  # llama_supports_gpu_offload(): the build has a GPU backend (a device may still be missing)
    devices: tuple[GpuDevice, ...] = ()
    reason: str | None = None
    source: str = "ggml"  # ggml | nvidia-smi | library files | fault hook

    @property
    def free_bytes(self) -> int:
        # llama.cpp spreads layers over every GPU in proportion to its free memory (split mode "layer")
        return sum(d.free_bytes for d in self.devices)

    @property
    def total_bytes(self) -> int:
        return sum(d.total_bytes for d in self.devices)

    @property
    def names(self) -> str:
        return ", ".join(f"{d.description or d.name}" for d in self.devices)


def faults(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test hook's switches: ``{"fake": "4096:8192", "load-fail": "", ...}``."""
    text = (os.environ if environ is None else environ).get(FAULT_ENV, "")
    out: dict[str, str] = {}
    for part in text.split(","):
        name, _, arg = part.strip().partition(":")
        if name:
            out[name] = arg
    return out


def _fake_device(arg: str) -> GpuDevice:
    free_s, _, total_s = arg.partition(":")
    free = int(float(free_s or "0") * 2**20)
    total = int(float(total_s) * 2**20) if total_s else max(free, 1)
    return GpuDevice("FAKE0", f"fake GPU ({FAULT_ENV})", total, free)


# ---------------------------------------------------------------------------- without llama.cpp


def library_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where llama-cpp-python loads libllama from (``LLAMA_CPP_LIB_PATH``, else its package's lib/)."""
    env = os.environ if environ is None else environ
    if env.get("LLAMA_CPP_LIB_PATH"):
        return Path(env["LLAMA_CPP_LIB_PATH"])
    try:
        spec = importlib.util.find_spec("llama_cpp")  # finds the package without importing (loading) it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def gpu_libraries(lib_dir: Path) -> list[str]:
    """The GPU backend libraries in ``lib_dir`` (``libggml-cuda.so`` ...)."""
    try:
        names = os.listdir(lib_dir)
    except OSError:
        return []
    return sorted(n for n in names if any(n.startswith(f"libggml-{b}.") or n.startswith(f"ggml-{b}.") for b in _GPU_LIBS))


def _cpu_only_build(environ: Mapping[str, str]) -> str | None:
    """A reason when the installed llama.cpp surely has no GPU backend (its libraries are all CPU ones)."""
    d = library_dir(environ)
    if d is None or not (d / "libggml-base.so").exists() and not (d / "libggml-base.dylib").exists():
        return None  # a static or unusual build: ask llama.cpp itself
    if gpu_libraries(d):
        return None
    return f"this llama.cpp build has no GPU backend (no libggml-cuda/vulkan/metal/... in {d}); using CPU"


def nvidia_smi() -> list[GpuDevice]:
    """NVIDIA GPUs and their memory from ``nvidia-smi`` (the fallback); [] when it is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            try:
                found.append(GpuDevice(f"CUDA{int(parts[0])}", parts[1], int(parts[2]) << 20, int(parts[3]) << 20))
            except ValueError:
                continue
    return found


async def probe(python: str, extra_env: Mapping[str, str] | None = None, timeout: float = PROBE_TIMEOUT) -> GpuProbe:
    """What GPU the engine's workers would get now. Never raises: a failure is a probe with a reason."""
    env = {**os.environ, **(extra_env or {})}
    hooks = faults(env)
    if "fake" in hooks:
        return GpuProbe(True, (_fake_device(hooks["fake"]),), source="fault hook")
    if "probe-crash" not in hooks:
        cpu_only = _cpu_only_build(env)
        if cpu_only is not None:
            return GpuProbe(False, reason=cpu_only, source="library files")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = await asyncio.create_subprocess_exec(python, "-m", "engine.gpu", stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    env=env, cwd=root)
    except OSError as exc:
        return GpuProbe(False, reason=f"the GPU probe could not start ({exc}); using CPU", source="probe")
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return GpuProbe(False, reason=f"the GPU probe took longer than {timeout:.0f} s (a hung driver?); using CPU",
                        source="probe")
    tail = " | ".join(line.strip() for line in err.decode(errors="replace").splitlines()[-4:] if line.strip())
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        return GpuProbe(False, reason=f"the GPU probe failed ({how}: {tail or 'nothing printed'}); using CPU",
                        source="probe")
    try:
        found = msgspec.json.decode(out.strip().splitlines()[-1], type=GpuProbe)
    except (msgspec.DecodeError, IndexError):
        return GpuProbe(False, reason=f"the GPU probe printed no answer ({tail or 'nothing'}); using CPU", source="probe")
    if found.reason and tail:  # what the backend logged on its way to "no device" (cuda init failed: ...)
        found = msgspec.structs.replace(found, reason=f"{found.reason} [{tail[-300:]}]")
    return found


# ---------------------------------------------------------------------------- with llama.cpp (worker, probe child)


def _ggml_libs(ll: Any) -> list[ctypes.CDLL]:
    """The ggml libraries beside the loaded libllama (already loaded: dlopen returns the same handles)."""
    libs: list[ctypes.CDLL] = []
    base = getattr(getattr(ll, "llama_cpp", None), "_base_path", None)
    for name in ("libggml.so", "libggml-base.so", "libggml.dylib", "libggml-base.dylib"):
        if base is not None and (Path(base) / name).exists():
            try:
                libs.append(ctypes.CDLL(str(Path(base) / name)))
            except OSError:
                continue
    lib = getattr(getattr(ll, "llama_cpp", None), "_lib", None)
    if lib is not None:
        libs.append(lib)  # dlsym on libllama's handle also searches the libraries it links
    return libs


def _sym(libs: list[ctypes.CDLL], name: str, restype: Any, argtypes: list[Any]) -> Any:
    for lib in libs:
        try:
            fn = getattr(lib, name)
        except AttributeError:
            continue
        fn.restype, fn.argtypes = restype, argtypes
        return fn
    raise AttributeError(name)


def devices(ll: Any) -> list[GpuDevice] | None:
    """The GPU devices ggml registered and their memory now; None when the device API is not reachable."""
    try:
        libs = _ggml_libs(ll)
        count = _sym(libs, "ggml_backend_dev_count", ctypes.c_size_t, [])
        get = _sym(libs, "ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t])
        name = _sym(libs, "ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p])
        desc = _sym(libs, "ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p])
        kind = _sym(libs, "ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p])
        memory = _sym(libs, "ggml_backend_dev_memory", None,
                      [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)])
    except AttributeError:
        return None
    found: list[GpuDevice] = []
    for i in range(int(count())):
        dev = get(i)
        t = int(kind(dev))
        if t not in (_DEV_GPU, _DEV_IGPU):
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(GpuDevice((name(dev) or b"?").decode(errors="replace"), (desc(dev) or b"").decode(errors="replace"),
                               int(total.value), int(free.value), integrated=t == _DEV_IGPU))
    return found


_BUFFER = re.compile(r"^\s*\w+:\s+(\S+)\s+(model|KV|compute|output|RS)\s+buffer size\s*=\s*([0-9.]+)\s*MiB")


def buffer_sizes(log_lines: list[str]) -> dict[str, int]:
    """llama.cpp's "CUDA0 model buffer size = 48.00 MiB" log lines summed per ``"<buffer> <kind>"``."""
    sizes: dict[str, int] = {}
    for line in log_lines:
        m = _BUFFER.match(line)
        if m:
            key = f"{m.group(1)} {m.group(2)}"
            sizes[key] = sizes.get(key, 0) + int(float(m.group(3)) * 2**20)
    return sizes


def is_host_buffer(key: str) -> bool:
    """A buffer in host memory: ggml's CPU ones (CPU, CPU_Mapped, CPU_REPACK) and pinned host buffers."""
    name = key.split(" ", 1)[0]
    return name.startswith("CPU") or name.endswith("_Host")


_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


def offloaded_layers(log_lines: list[str]) -> int | None:
    """llama.cpp's own count ("load_tensors: offloaded 9/9 layers to GPU"); None when it said nothing."""
    for line in reversed(log_lines):
        m = _OFFLOADED.search(line)
        if m:
            return int(m.group(1))
    return None


def _main() -> int:
    """``python -m engine.gpu``: one JSON line, a :class:`GpuProbe`."""
    if "probe-crash" in faults():
        os.abort()  # the test hook: die the way a broken driver's init does
    import llama_cpp as ll

    ll.llama_backend_init()
    backend = bool(ll.llama_supports_gpu_offload())
    found = devices(ll)
    source = "ggml"
    if found is None:
        found, source = nvidia_smi(), "nvidia-smi"
    reason = None
    if not backend:
        reason = "this llama.cpp build has no GPU backend (llama_supports_gpu_offload() is false); using CPU"
    elif not found:
        reason = "llama.cpp's GPU backend found no device (driver missing or no GPU visible); using CPU"
    sys.stdout.write(msgspec.json.encode(GpuProbe(backend, tuple(found) if backend else (), reason, source)).decode()
                     + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
