"""install.sh: LAMABUS_GPU=cuda adds -DGGML_CUDA=ON (a wheel cached apart); unset, the flags and key are as before."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _flags(gpu: str | None) -> subprocess.CompletedProcess[str]:
    """Run install.sh's own flag lines (from LLAMA_CMAKE_ARGS= to the LAMABUS_GPU case) and print the result."""
    text = (ROOT / "install.sh").read_text()
    m = re.search(r'^LLAMA_CMAKE_ARGS=.*?^esac$', text, re.M | re.S)
    assert m, "install.sh sets LLAMA_CMAKE_ARGS and then reads LAMABUS_GPU"
    env = {k: v for k, v in os.environ.items() if k not in ("LAMABUS_GPU", "LAMABUS_LLAMA_CMAKE_ARGS")}
    if gpu is not None:
        env["LAMABUS_GPU"] = gpu
    script = "set -euo pipefail\n" + m.group(0) + '\nprintf "%s" "$LLAMA_CMAKE_ARGS"\n'
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=False)


def _key(flags: str) -> str:
    return hashlib.sha256(f"0.3.36|{flags}".encode()).hexdigest()[:16]


def test_default_flags_unchanged() -> None:
    out = _flags(None)
    assert out.returncode == 0 and out.stdout == "-DGGML_NATIVE=OFF"
    assert _flags("").stdout == "-DGGML_NATIVE=OFF"


def test_cuda_adds_ggml_cuda_and_a_new_cache_key() -> None:
    out = _flags("cuda")
    assert out.returncode == 0 and out.stdout == "-DGGML_NATIVE=OFF -DGGML_CUDA=ON"
    assert _key(out.stdout) != _key("-DGGML_NATIVE=OFF")


@pytest.mark.parametrize("gpu", ["rocm", "CUDA "])
def test_unknown_gpu_is_refused(gpu: str) -> None:
    out = _flags(gpu)
    assert out.returncode == 2 and "only 'cuda'" in out.stderr
