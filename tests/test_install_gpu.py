"""install.sh: LAMABUS_GPU=cuda adds -DGGML_CUDA=ON (a wheel cached apart); unset, the flags and key are as before."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
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


def _flags_with(**env_over: str) -> subprocess.CompletedProcess[str]:
    text = (ROOT / "install.sh").read_text()
    m = re.search(r'^LLAMA_CMAKE_ARGS=.*?^fi$', text, re.M | re.S)
    assert m, "install.sh sets LLAMA_CMAKE_ARGS, reads LAMABUS_GPU, then LAMABUS_CUDA_ARCH"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMABUS_")} | env_over
    script = "set -euo pipefail\n" + m.group(0) + '\nprintf "%s" "$LLAMA_CMAKE_ARGS"\n'
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize("arch", ["90", "89", "86;90", "native", "90a", "90-real"])
def test_cuda_arch_is_part_of_the_flags_and_the_key(arch: str) -> None:
    out = _flags_with(LAMABUS_GPU="cuda", LAMABUS_CUDA_ARCH=arch)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"-DGGML_NATIVE=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES={arch}"
    assert _key(out.stdout) != _key("-DGGML_NATIVE=OFF -DGGML_CUDA=ON")


@pytest.mark.parametrize(("env", "why"), [
    ({"LAMABUS_CUDA_ARCH": "90"}, "needs LAMABUS_GPU=cuda"),
    ({"LAMABUS_GPU": "cuda", "LAMABUS_CUDA_ARCH": "sm_90"}, "expected e.g. 90"),
    ({"LAMABUS_GPU": "cuda", "LAMABUS_CUDA_ARCH": "90; rm -rf /"}, "expected e.g. 90"),
])
def test_bad_cuda_arch_is_refused(env: dict[str, str], why: str) -> None:
    out = _flags_with(**env)
    assert out.returncode == 2 and why in out.stderr


def _pick_python(path_dirs: list[Path], python: str | None = None) -> subprocess.CompletedProcess[str]:
    text = (ROOT / "install.sh").read_text()
    m = re.search(r'^# The newest supported Python.*?^fi$', text, re.M | re.S)
    assert m, "install.sh picks its Python"
    env = {"PATH": os.pathsep.join(str(d) for d in path_dirs)} | ({"PYTHON": python} if python else {})
    script = "set -euo pipefail\n" + m.group(0) + '\nprintf "%s" "$PYTHON"\n'
    return subprocess.run(["/bin/bash", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=False)


def _fake_python(folder: Path, name: str, version: tuple[int, int]) -> None:
    """A `pythonX.Y` that answers the version check as that version would."""
    f = folder / name
    f.write_text(f"#!/bin/sh\nexec {os.path.realpath(sys.executable)} -c "
                 f"'import sys; sys.exit(not ((3, 11) <= {version} <= (3, 13)))'\n")
    f.chmod(0o755)


def test_install_picks_the_newest_supported_python(tmp_path: Path) -> None:
    _fake_python(tmp_path, "python3.11", (3, 11))
    _fake_python(tmp_path, "python3.12", (3, 12))
    _fake_python(tmp_path, "python3", (3, 10))
    out = _pick_python([tmp_path])
    assert out.returncode == 0 and out.stdout == "python3.12"


def test_install_refuses_an_old_python(tmp_path: Path) -> None:
    _fake_python(tmp_path, "python3", (3, 10))
    out = _pick_python([tmp_path])
    assert out.returncode == 2 and "3.11, 3.12 or 3.13" in out.stderr
    _fake_python(tmp_path, "python3.9", (3, 9))
    out = _pick_python([tmp_path], python=str(tmp_path / "python3.9"))
    assert out.returncode == 2 and "PYTHON=" in out.stderr
