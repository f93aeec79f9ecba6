"""The deployment files are valid and say what the README says."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (.ci/run installs it)")
def test_docker_compose_file_validates_offline():
    out = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "- --jetstream" in text
    assert "LAMABUS_NATS_URL: nats://nats:4222" in text
    assert "nats-data:/data:rw" in text and "lamabus-data:/data:rw" in text and "models:/models:rw" in text


def test_dockerfile_builds_llama_without_native_cpu_flags():
    text = (ROOT / "Dockerfile").read_text()
    assert "-DGGML_NATIVE=OFF" in text
    assert "COPY --from=build" in text


def test_installed_llama_build_has_no_amx_kernel():
    # The default (native) build segfaults on this machine inside ggml's AMX int8 kernel.
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX_INT8 = 1" not in info, info


def test_cli_entry_point_lists_commands():
    exe = Path(sys.executable).parent / "lamabus"
    assert exe.exists(), "install.sh installs the lamabus command beside the interpreter"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("serve", "chat"):
        assert command in out.stdout
