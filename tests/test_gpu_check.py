"""bench/gpu_check.sh (issue 22): what a machine without a GPU can check of it. Its dry run prints the
GPU steps (the one-architecture CUDA build, llama-server, serve, the bench with every layer offloaded);
its --cpu mode runs every step but the build for real, with 0 layers, on the bundled model, with the
GPU test hook making the service's load fall back from a (fake) GPU to the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LAMABUS_")}
    base["LAMABUS_PYTHON"] = sys.executable
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**base, **(env or {})}, stdin=subprocess.DEVNULL)


def test_dry_run_prints_the_gpu_steps(model_path: Path, tmp_path: Path):
    r = _run("--dry-run", "--arch", "89", "--model", str(model_path), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "LAMABUS_GPU=cuda LAMABUS_CUDA_ARCH=89 ./install.sh" in out or "already has its CUDA library" in out
    assert "LAMABUS_GPU=cuda" in out and "-m bench.llama_server_build" in out
    assert f"-m bench --streams-only --gpu-layers 999 --llama-server --model {model_path}" in out
    assert "bus.cli serve" in out and "diagnostics --json" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_on_cpu_builds_nothing(model_path: Path):
    r = _run("--dry-run", "--cpu", "--model", str(model_path))
    assert r.returncode == 0, r.stderr
    assert "install.sh" not in r.stdout and "llama_server_build" not in r.stdout
    assert "--gpu-layers 0" in r.stdout and "--llama-server" not in r.stdout


def test_bad_arguments_are_refused(tmp_path: Path):
    r = _run("--frobnicate")
    assert r.returncode == 2 and "unknown argument --frobnicate" in r.stderr
    r = _run("--cpu", "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "no model file" in r.stderr


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.timeout(900)
def test_cpu_mode_serves_chats_diagnoses_and_benches(model_path: Path, tmp_path: Path):
    out = tmp_path / "out"
    r = _run("--cpu", "--quick", "--model", str(model_path), "--out", str(out),
             env={"LAMABUS_GPU_FAULT": "fake:4096,load-fail", "TMPDIR": str(tmp_path)}, timeout=840)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the chat was answered, and the diagnostics line says where the model ran and why not on the GPU
    assert "tokens" in r.stdout and "0 of 31 layers" in r.stdout and "asked: auto, planned 31" in r.stdout
    assert "why not: loading with n_gpu_layers=31 failed" in r.stdout
    log = (out / "serve.log").read_text()
    assert log.count("running on the CPU, not the GPU") == 1 and "Traceback" not in log
    diag = json.loads((out / "diagnostics.json").read_text())
    (model,) = diag["service"]["engine"]["models"]
    assert model["gpu"]["fellBackToCpu"] is True
    results = json.loads((out / "results.json").read_text())
    assert results["parameters"]["gpu_layers"] == 0 and results["gpu"]["nGpuLayersUsed"] == 0
    assert results["single_stream"]["tps"]["bus"] > 0
    assert [c["topics"] for c in results["concurrency"]] == [1, 8]
    assert "conversation" not in results  # --streams-only


def test_the_benchmark_page_says_what_was_measured_on_a_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from bench import report_apart

    # report_apart reads bench/gpu.json beside its module: point it at a scratch place
    monkeypatch.setattr(report_apart, "__file__", str(tmp_path / "report_apart.py"))
    assert "Not measured with it" in report_apart.gpu_section() and "0.987" in report_apart.gpu_section()
    (tmp_path / "gpu.json").write_text(json.dumps({
        "command": "python -m bench --streams-only --gpu-layers 999", "date": "2026-12-04 18:00 UTC",
        "parameters": {"gpu_layers": 999}, "gpu": {"nGpuLayersUsed": 9, "layers": 9, "device": "NVIDIA H200"},
        "single_stream": {"tps": {"bus": 1668.0}}, "llama_server_one_stream_tps": 1690.0,
        "bus_over_llama_server_tps": 0.98698, "concurrency": [{"topics": 1, "aggregate_tps": 1600.0},
                                                              {"topics": 8, "aggregate_tps": 3492.0}],
        "llama_server_8_streams_tps": 3534.0, "batched8_over_llama_server": 0.98812}))
    section = report_apart.gpu_section()
    assert "9 of 9 layers on NVIDIA H200" in section and "Not measured" not in section
    rows = [line for line in section.splitlines() if line.startswith("| one stream") or line.startswith("| 8 topics")]
    assert rows == ["| one stream, tok/s | 1668.0 | 1690.0 | 0.987 |", "| 8 topics, aggregate tok/s | 3492.0 | 3534.0 | 0.988 |"]
    # the committed page carries the section as rendered from what is committed
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    monkeypatch.setattr(report_apart, "__file__", str(ROOT / "bench" / "report_apart.py"))
    assert report_apart.gpu_section() in page
