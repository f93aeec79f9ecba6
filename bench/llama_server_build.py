"""Build llama.cpp's ``llama-server`` and ``llama-batched-bench`` once, cached like install.sh's wheel.

    .venv/bin/python -m bench.llama_server_build          # build (about 7+ min on 2 cores), print the dir
    .venv/bin/python -m bench.llama_server_build --where  # print the cache dir, build nothing (exit 1 if absent)
    .venv/bin/python -m bench --llama-server              # the bench, building first when needed

The source is the llama.cpp that the installed llama-cpp-python was built
from: the sdist of the version pinned in requirements-llama.txt carries it
under ``vendor/llama.cpp`` (``pip download --no-binary :all:``; pip's HTTP
cache serves it again without the network). The flags are install.sh's
(``GGML_NATIVE=OFF``, the AVX2 kernels, not the build machine's own, which
crash on AMX CPUs) plus what a stand-alone tool build needs: no libcurl, no
web UI download, static libraries so the two binaries run from the cache
directory alone. The cache key is the version and the flags, as for the wheel:

    ~/.cache/lamabus/llama-server/llama.cpp-<version>-<sha256(version|flags)[:16]>/
        llama-server  llama-batched-bench  build-info.txt

Two ways to build, the same source and flags:

* ``wheel`` (the default): compile only what the tools add (llama.cpp's
  ``common``, the server, the bench, cpp-httplib) and link them against the
  installed wheel's own ``libllama.so``/``libggml*.so``/``libmtmd.so``, which
  install.sh built from this very source with these flags. llama-server then
  runs the very kernels lamabus runs, and the build takes a fifth of the time
  (about 50 files instead of 250: 7+ minutes become 2-3 on 2 idle cores). The
  binaries find the libraries through their RUNPATH (the venv's
  ``llama_cpp/lib``), so the key holds that directory too.
* ``source`` (``--from-source``): everything from source, static, stand-alone.

``LAMABUS_GPU=cuda`` adds ``-DGGML_CUDA=ON`` (as install.sh does), so a CUDA
build has its own key.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARIES = ("llama-server", "llama-batched-bench")
#: The wheel's flags (install.sh) and a tools build: no libcurl, no web UI download, no tests or examples; the
#: tools' own libraries (common, the server's and the bench's code) static, so the binaries stand alone.
BASE_FLAGS = ("-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF")


def llama_cpp_version(requirements: Path = ROOT / "requirements-llama.txt") -> str:
    """The llama-cpp-python version install.sh builds (the pin in requirements-llama.txt)."""
    m = re.search(r"^llama-cpp-python==([0-9.]+)", requirements.read_text(), re.M)
    if not m:
        raise RuntimeError(f"no llama-cpp-python pin in {requirements}")
    return m.group(1)


def cmake_flags(env: dict[str, str] | None = None) -> tuple[str, ...]:
    env = os.environ if env is None else env
    flags = list(BASE_FLAGS)
    if env.get("LAMABUS_GPU", "").strip().lower() == "cuda":
        flags.append("-DGGML_CUDA=ON")
    return tuple(flags)


def wheel_lib_dir() -> Path | None:
    """The installed llama-cpp-python's shared libraries (None when it has none)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return lib if (lib / "libllama.so").is_file() else None


def cache_dir(version: str | None = None, flags: tuple[str, ...] | None = None, mode: str = "wheel") -> Path:
    version = version or llama_cpp_version()
    flags = cmake_flags() if flags is None else flags
    what = f"{version}|{' '.join(flags)}"
    if mode == "wheel":
        what += f"|wheel-libs:{wheel_lib_dir()}"
    key = hashlib.sha256(what.encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lamabus" / "llama-server" / f"llama.cpp-{version}-{key}"


def cached_binaries(directory: Path | None = None) -> dict[str, Path] | None:
    """{name: path} when both binaries are in the cache (either build), else None."""
    for d in ([directory] if directory else [cache_dir(mode="wheel"), cache_dir(mode="source")]):
        paths = {name: d / name for name in BINARIES}
        if all(p.is_file() and os.access(p, os.X_OK) for p in paths.values()):
            return paths
    return None


def _link_wheel_libs(src: Path, lib: Path) -> None:
    """Make llama, ggml and mtmd targets that link the wheel's libraries instead of building them."""
    inc = "${PROJECT_SOURCE_DIR}"
    (src / "ggml" / "CMakeLists.txt").write_text(
        "# lamabus bench: ggml is the installed llama-cpp-python's (bench/llama_server_build.py)\n"
        "add_library(ggml INTERFACE)\n"
        f"target_include_directories(ggml INTERFACE {inc}/ggml/include)\n"
        f"target_link_libraries(ggml INTERFACE {lib}/libggml.so {lib}/libggml-base.so {lib}/libggml-cpu.so)\n")
    (src / "src" / "CMakeLists.txt").write_text(
        "# lamabus bench: libllama is the installed llama-cpp-python's\n"
        "add_library(llama INTERFACE)\n"
        f"target_include_directories(llama INTERFACE {inc}/include)\n"
        f"target_link_libraries(llama INTERFACE {lib}/libllama.so ggml)\n")
    (src / "tools" / "mtmd" / "CMakeLists.txt").write_text(
        "# lamabus bench: libmtmd is the installed llama-cpp-python's\n"
        "add_library(mtmd INTERFACE)\n"
        "target_include_directories(mtmd INTERFACE ${CMAKE_CURRENT_SOURCE_DIR})\n"
        f"target_link_libraries(mtmd INTERFACE {lib}/libmtmd.so llama ggml)\n")


def _source(version: str, work: Path, log) -> Path:
    """Unpack the sdist of llama-cpp-python==version; return its vendor/llama.cpp."""
    log(f"fetching the llama-cpp-python {version} sdist (pip download; pip's cache when it has it)")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", f"llama-cpp-python=={version}",
                    "--no-deps", "--no-binary", ":all:", "-d", str(work)],
                   check=True, timeout=900)
    sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        raise RuntimeError("pip download left no llama_cpp_python sdist")
    with tarfile.open(sdists[0]) as tf:
        members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name]
        tf.extractall(work, members=members, filter="data")
    src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if src is None or not (src / "CMakeLists.txt").is_file():
        raise RuntimeError("the sdist has no vendor/llama.cpp")
    return src


def build(jobs: int | None = None, log=print, mode: str = "wheel") -> dict[str, Path]:
    """Build both binaries into the cache (nothing to do when they are there); return their paths."""
    version, flags = llama_cpp_version(), cmake_flags()
    lib = wheel_lib_dir() if mode == "wheel" else None
    if mode == "wheel" and lib is None:
        log("the installed llama-cpp-python has no shared libraries to link: building everything from source")
        mode = "source"
    dest = cache_dir(version, cmake_flags(), mode)
    have = cached_binaries(dest)
    if have:
        return have
    jobs = jobs or os.cpu_count() or 2
    log(f"building {' '.join(BINARIES)} from llama-cpp-python {version}'s llama.cpp with {' '.join(flags)}"
        + (f", linked to the wheel's libraries in {lib}" if lib else ", everything from source")
        + f" (-j{jobs}, minutes, once)")
    with tempfile.TemporaryDirectory(prefix="lamabus-llama-server-") as tmp:
        work = Path(tmp)
        src = _source(version, work, log)
        if lib is not None:
            _link_wheel_libs(src, lib)
        b = work / "b"
        subprocess.run(["cmake", "-S", str(src), "-B", str(b), "-DCMAKE_BUILD_TYPE=Release", *flags],
                       check=True, timeout=900, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(b), "--target", *BINARIES, f"-j{jobs}"],
                       check=True, timeout=7200)
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name in BINARIES:
            found = next((p for p in (b / "bin" / name, b / name) if p.is_file()), None)
            if found is None:
                raise RuntimeError(f"the build produced no {name}")
            shutil.copy2(found, partial / name)
            # It must start here, outside the build tree (every library it needs found).
            subprocess.run([str(partial / name), "--version"], check=True, timeout=60, capture_output=True)
        (partial / "build-info.txt").write_text(
            f"llama-cpp-python {version} (vendor/llama.cpp)\ncmake flags: {' '.join(flags)} "
            f"-DCMAKE_BUILD_TYPE=Release\n"
            + (f"linked against the installed wheel's libllama/libggml/libmtmd in {lib}\n" if lib else
               "built entirely from source, static\n"))
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
    have = cached_binaries(dest)
    assert have is not None
    return have


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.llama_server_build", description=__doc__.splitlines()[0])
    ap.add_argument("--where", action="store_true", help="print the cache dir; build nothing (exit 1 if absent)")
    ap.add_argument("-j", "--jobs", type=int, help="parallel compile jobs (default: all cores)")
    ap.add_argument("--from-source", action="store_true",
                    help="build llama.cpp and ggml too (static) instead of linking the wheel's libraries")
    args = ap.parse_args(argv)
    if args.where:
        have = cached_binaries()
        print(have["llama-server"].parent if have else cache_dir())
        return 0 if have else 1
    paths = build(args.jobs, mode="source" if args.from_source else "wheel")
    print(paths["llama-server"].parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
