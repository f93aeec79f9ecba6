"""Issue 22, section 4: where llama.cpp cannot use the GPU (no driver, no VRAM, a load that fails), the
model runs on the CPU, with one clear log line and a diagnostics field saying why, never a crash.

Tested on CPU machines with the GPU test hook (engine/gpu.py, ``LAMABUS_GPU_FAULT``): ``fake:MIB``
makes the probe report a GPU with that much free memory (so the plan offloads layers), ``load-fail``
makes the worker's first load with GPU layers fail as an out-of-VRAM allocation does, ``probe-crash``
makes the probe child abort like a broken driver. Everything else is real: the worker process, the
bundled GGUF, llama.cpp, and for the service the nats-server and the API."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest

from engine.gpu import GpuProbe
from engine.runtime import Engine
from engine.types import ChatTurn, GenerateRequest, ModelConfig
from wire.errors import ErrorCode, LamaError
from wire.params import GenerationParams, SamplingParams

pytestmark = pytest.mark.model

FALLBACK_LINE = "running on the CPU, not the GPU"


def _config(model_path: Path, **kw) -> ModelConfig:
    return ModelConfig(str(model_path), n_ctx=512, n_seq_max=2, **kw)


async def _answers(engine: Engine, handle: str) -> None:
    result = await engine.generate(handle, GenerateRequest(
        "r1", SamplingParams.resolve(GenerationParams(max_tokens=4)), messages=(ChatTurn("user", "Hi"),)))
    assert result.tokens > 0


def _fallback_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "engine" and FALLBACK_LINE in r.getMessage()]


async def test_on_a_cpu_build_auto_is_the_cpu_and_the_prediction_is_llama_cpps(model_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="engine")
    async with Engine() as engine:
        await _answers(engine, await engine.initialize(_config(model_path)))
        (m,) = engine.diagnostics()["models"]
    g, predicted = m["gpu"], m["memory"]["predicted"]
    if m["gpu"]["devices"]:
        pytest.skip("this llama.cpp has a GPU: tests/test_gpu_plan.py and bench/gpu_check.sh cover it")
    assert (g["nGpuLayersRequested"], g["nGpuLayersPlanned"], g["nGpuLayersUsed"], g["layers"]) == ("auto", 0, 0, 31)
    assert "no GPU backend" in g["reasonNoGPU"] and not g["fellBackToCpu"] and g["vramUsedByModelBytes"] == 0
    # llama.cpp's own buffers: the KV cache it allocated is the one predicted, to the byte
    assert g["buffers"]["CPU KV"] == predicted["kvCacheBytes"] and predicted["vramBytes"] == 0
    assert g["buffers"]["CPU_Mapped model"] > 90 << 20
    assert not _fallback_lines(caplog)  # a CPU build is no fallback: an INFO line, not a warning
    assert any("on the CPU" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


async def test_a_gpu_the_build_cannot_use_falls_back_with_one_line(model_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="engine")
    async with Engine(worker_env={"LAMABUS_GPU_FAULT": "fake:8192"}) as engine:
        handle = await engine.initialize(_config(model_path))
        await _answers(engine, handle)
        (m,) = engine.diagnostics()["models"]
    g = m["gpu"]
    assert (g["nGpuLayersRequested"], g["nGpuLayersPlanned"], g["nGpuLayersUsed"]) == ("auto", 31, 0)
    assert g["vramFreeBeforeLoadBytes"] == 8192 << 20
    assert "no GPU backend" in g["reasonNoGPU"] and "llama_supports_gpu_offload" in g["reasonNoGPU"]
    assert m["memory"]["predicted"]["vramBytes"] > 0  # the plan's prediction, with its VRAM part
    (line,) = _fallback_lines(caplog)
    assert line.levelno == logging.WARNING and str(model_path) in line.getMessage()


async def test_a_load_that_fails_on_the_gpu_is_retried_on_the_cpu(model_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="engine")
    async with Engine(worker_env={"LAMABUS_GPU_FAULT": "fake:8192,load-fail"}) as engine:
        handle = await engine.initialize(_config(model_path, n_gpu_layers=99))
        await _answers(engine, handle)
        (m,) = engine.diagnostics()["models"]
        assert m["worker"]["restarts"] == 0  # one worker: the retry is inside it, not a crash and a restart
    g = m["gpu"]
    assert (g["nGpuLayersRequested"], g["nGpuLayersPlanned"], g["nGpuLayersUsed"]) == (99, 31, 0)
    assert g["fellBackToCpu"] is True
    assert g["reasonNoGPU"].startswith("loading with n_gpu_layers=31 failed (")
    assert "simulated out-of-VRAM" in g["reasonNoGPU"] and g["reasonNoGPU"].endswith("fell back to CPU")
    (line,) = _fallback_lines(caplog)
    assert "n_gpu_layers=31 failed" in line.getMessage()


async def test_too_little_vram_for_the_layers_asked_is_out_of_memory_before_any_load(model_path: Path):
    async with Engine(worker_env={"LAMABUS_GPU_FAULT": "fake:200"}) as engine:
        with pytest.raises(LamaError) as exc:
            await engine.initialize(_config(model_path, n_gpu_layers=99))
        assert exc.value.code == ErrorCode.OUT_OF_MEMORY and "VRAM" in exc.value.message
        assert engine.diagnostics()["workers"] == 0
        # auto on the same GPU takes what fits (here: none) and loads
        await _answers(engine, await engine.initialize(_config(model_path)))
        (m,) = engine.diagnostics()["models"]
        assert m["gpu"]["nGpuLayersPlanned"] == 0 and "0 of 31 layers fit" in m["gpu"]["reasonNoGPU"]


async def test_a_crashing_gpu_probe_leaves_the_model_on_the_cpu(model_path: Path):
    async with Engine(worker_env={"LAMABUS_GPU_FAULT": "probe-crash"}) as engine:
        await _answers(engine, await engine.initialize(_config(model_path)))
        (m,) = engine.diagnostics()["models"]
    assert m["gpu"]["nGpuLayersUsed"] == 0 and "GPU probe failed (signal 6" in m["gpu"]["reasonNoGPU"]


async def test_the_service_setting_overrides_auto_and_a_model_count_overrides_it(model_path: Path):
    asked: list[int] = []

    async def probe() -> GpuProbe:
        asked.append(1)
        return GpuProbe(False, reason="pretend: no GPU")

    async with Engine(gpu_layers=0, gpu_probe=probe) as engine:
        await engine.initialize(_config(model_path))  # auto -> the service's 0: no probe at all
        assert asked == []
        (m,) = engine.diagnostics()["models"]
        assert (m["gpu"]["nGpuLayersRequested"], m["gpu"]["nGpuLayersUsed"]) == (0, 0)
        await engine.initialize(_config(model_path, n_gpu_layers=4))  # the model's own count wins
        assert asked == [1]
        await engine.initialize(_config(model_path, n_gpu_layers=5, n_batch=256))
        assert asked == [1]  # a probe that found no device is kept: a CPU build stays one
        by_request = {m["gpu"]["nGpuLayersRequested"]: m["gpu"] for m in engine.diagnostics()["models"]}
        assert by_request[4]["nGpuLayersUsed"] == 0 and by_request[4]["reasonNoGPU"] == "pretend: no GPU"


async def test_the_service_answers_on_the_cpu_and_diagnostics_say_why(settings, monkeypatch, caplog):
    # The whole service, its engine's workers told that a GPU is there and that loading onto it fails.
    monkeypatch.setenv("LAMABUS_GPU_FAULT", "fake:8192,load-fail")
    caplog.set_level(logging.INFO, logger="engine")
    from bus.client import LamabusClient
    from bus.node.app import LamabusService
    from tests.conftest import entered_in_own_task
    from wire.messages import GenerationCompleted

    async with entered_in_own_task(LamabusService(settings)) as service:
        async with LamabusClient.connect(service.url, prefix=service.settings.prefix) as client:
            items = [i async for i in client.ask("gpu", "Hi", params=GenerationParams(max_tokens=3))]
            assert isinstance(items[-1], GenerationCompleted) and items[-1].tokens > 0
            reply = await client.nc.request(f"{service.subjects.api}.diagnostics", b"{}", timeout=10)
    diag = msgspec.json.decode(reply.data)
    assert diag["service"]["defaults"]["n_gpu_layers"] == -1
    (m,) = diag["service"]["engine"]["models"]
    assert m["gpu"]["fellBackToCpu"] is True and m["gpu"]["nGpuLayersUsed"] == 0
    assert "fell back to CPU" in m["gpu"]["reasonNoGPU"]
    assert len(_fallback_lines(caplog)) == 1
