"""Issue 22: where a model's layers go. The GGUF's per-layer sizes, the RAM/VRAM prediction, the "auto"
layer count against free VRAM, the out_of_memory that names VRAM, and the GPU probe's parts. No GPU is
needed: the probe is a GpuProbe value here (a fake device), the model header the real bundled one."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from engine import gpu
from engine.gguf import read_model_info
from engine.gpu import GpuDevice, GpuProbe
from engine.memory import (
    GPU_OVERHEAD,
    HEADROOM,
    MemoryAvailable,
    fit_gpu_layers,
    offloadable_layers,
    plan_load,
    predict_memory,
)
from engine.types import ModelConfig
from wire.errors import ErrorCode, LamaError
from wire.params import DEFAULTS, GPU_LAYERS_AUTO

ROOT = Path(__file__).resolve().parent.parent
PLENTY = MemoryAvailable(64 << 30, "pretend")


def _gpu(free_mib: float, total_mib: float | None = None) -> GpuProbe:
    free = int(free_mib * 2**20)
    return GpuProbe(True, (GpuDevice("CUDA0", "Test GPU", int((total_mib or free_mib) * 2**20), free),))


@pytest.fixture(scope="module")
def info(model_path: Path):
    return read_model_info(model_path)


@pytest.fixture(scope="module")
def config(model_path: Path) -> ModelConfig:
    return ModelConfig(str(model_path), n_ctx=1024, n_seq_max=4)


def test_the_default_is_auto():
    assert DEFAULTS.n_gpu_layers == GPU_LAYERS_AUTO == -1
    assert ModelConfig("m.gguf").n_gpu_layers == GPU_LAYERS_AUTO


def test_gguf_sizes_each_layer(info):
    # SmolLM2-135M: 30 blocks of one shape and quantization; tied embeddings, so the output layer (which
    # llama.cpp gives a copy of token_embd) weighs what the input layer does, plus output_norm.
    assert len(info.layer_bytes) == info.block_count == 30
    assert len(set(info.layer_bytes)) == 1 and info.layer_bytes[0] > 1 << 20
    assert info.input_bytes > 10 << 20
    assert info.input_bytes < info.output_bytes < info.input_bytes + (64 << 10)
    # blocks + output_norm + the embedding (in the output's count, as its copy) is the whole file's data
    assert 0.99 * info.tensor_data_bytes < sum(info.layer_bytes) + info.output_bytes <= info.tensor_data_bytes
    assert offloadable_layers(info) == 31


def test_one_and_ninety_nine_layers_predict_differently(info, config):
    none, one, all_ = (predict_memory(info, config, n) for n in (0, 1, 99))
    assert (none.gpu_layers, one.gpu_layers, all_.gpu_layers) == (0, 1, 31)
    # 0 layers: everything in RAM, as before issue 22
    assert none.vram_bytes == 0 and none.ram_bytes == none.total_bytes
    assert none.total_bytes == none.weights_bytes + none.kv_cache_bytes + none.compute_bytes
    # 1 layer is llama.cpp's output layer: its weights and a compute buffer, no KV cache
    assert one.vram_weights_bytes == info.output_bytes and one.vram_kv_cache_bytes == 0
    assert one.vram_bytes > GPU_OVERHEAD
    # all: every block's weights and the whole KV cache on the GPU; only the input layer's weights stay
    assert all_.vram_kv_cache_bytes == all_.kv_cache_bytes
    assert all_.vram_weights_bytes == info.output_bytes + sum(info.layer_bytes)
    assert all_.ram_bytes < one.ram_bytes < none.ram_bytes
    assert none.vram_bytes < one.vram_bytes < all_.vram_bytes
    for p in (none, one, all_):
        assert p.ram_bytes + p.vram_bytes == p.total_bytes
    # -1 and past the end mean every layer
    assert predict_memory(info, config, -1) == predict_memory(info, config, 31) == all_
    # VRAM grows with every layer; RAM shrinks
    vram = [predict_memory(info, config, n).vram_bytes for n in range(32)]
    assert vram == sorted(vram) and len(set(vram)) == 32


def test_auto_takes_as_many_layers_as_fit(info, config):
    for k in (1, 2, 17, 31):
        need = predict_memory(info, config, k).vram_bytes + HEADROOM
        assert fit_gpu_layers(info, config, need) == k
        assert fit_gpu_layers(info, config, need - 1) == k - 1
    assert fit_gpu_layers(info, config, 1 << 40) == 31


def test_plan_auto_without_a_gpu_is_the_cpu_with_the_reason(info, config):
    why = "this llama.cpp build has no GPU backend (no libggml-cuda/... in lib); using CPU"
    plan = plan_load(info, config, PLENTY, GpuProbe(False, reason=why))
    assert plan.config.n_gpu_layers == 0 and plan.requested_gpu_layers == GPU_LAYERS_AUTO
    assert plan.note == why and plan.prediction.vram_bytes == 0


def test_plan_auto_on_a_big_gpu_offloads_every_layer(info, config):
    plan = plan_load(info, config, PLENTY, _gpu(80_000))
    assert plan.config.n_gpu_layers == 31 and plan.note is None
    assert plan.prediction.gpu_layers == 31 and plan.config.n_seq_max == 4


def test_plan_auto_on_a_small_gpu_offloads_part_and_says_so(info, config):
    free = predict_memory(info, config, 10).vram_bytes + HEADROOM
    plan = plan_load(info, config, PLENTY, GpuProbe(True, (GpuDevice("CUDA0", "Small GPU", 1 << 30, free),)))
    assert plan.config.n_gpu_layers == 10
    assert "10 of 31 layers fit" in plan.note and "Small GPU" in plan.note
    tiny = plan_load(info, config, PLENTY, _gpu(64))
    assert tiny.config.n_gpu_layers == 0 and "0 of 31 layers fit" in tiny.note and "first layer alone" in tiny.note


def test_a_count_that_cannot_fit_is_out_of_memory_naming_vram(info, config):
    with pytest.raises(LamaError) as exc:
        plan_load(info, msgspec.structs.replace(config, n_gpu_layers=99), PLENTY, _gpu(300))
    err = exc.value
    assert err.code == ErrorCode.OUT_OF_MEMORY
    assert "VRAM" in err.message and "Test GPU" in err.message and "300 MiB" in err.message
    assert err.details["available_vram"] == 300 << 20
    # it tried one sequence before refusing, and says how many layers would have fit
    one_seq = msgspec.structs.replace(config, n_seq_max=1)
    assert err.details["needed_vram"] == predict_memory(info, one_seq, 31).vram_bytes
    assert err.details["gpu_layers_that_fit"] == fit_gpu_layers(info, one_seq, 300 << 20)
    # a count that fits is taken as asked
    plan = plan_load(info, msgspec.structs.replace(config, n_gpu_layers=5), PLENTY, _gpu(80_000))
    assert plan.config.n_gpu_layers == 5 and plan.note == "5 of 31 layers asked for"


def test_ram_is_checked_without_the_offloaded_part(info, config):
    all_on_gpu = predict_memory(info, config, 31)
    room = MemoryAvailable(all_on_gpu.ram_bytes + HEADROOM, "pretend")
    # on the GPU it fits in RAM; on the CPU it does not, and out_of_memory names RAM
    assert plan_load(info, config, room, _gpu(80_000)).config.n_gpu_layers == 31
    with pytest.raises(LamaError) as exc:
        plan_load(info, msgspec.structs.replace(config, n_seq_max=1), room, GpuProbe(False, reason="no GPU"))
    assert exc.value.code == ErrorCode.OUT_OF_MEMORY and "of RAM" in exc.value.message and "pretend" in exc.value.message


def test_zero_layers_never_needs_a_gpu(info, config):
    plan = plan_load(info, msgspec.structs.replace(config, n_gpu_layers=0), PLENTY, None)
    assert plan.config.n_gpu_layers == 0 and plan.note == "n_gpu_layers is 0"


def test_a_block_index_beyond_the_tensors_is_a_bad_file(tmp_path: Path):
    # One F32 tensor named blk.7.x in a file of one tensor: no real model has that.
    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + s("blk.7.x") + struct.pack("<IQIQ", 1, 8, 0, 0)
    body = header + b"\0" * (-len(header) % 32) + b"\0" * 32
    (tmp_path / "odd.gguf").write_bytes(body)
    with pytest.raises(LamaError, match="names block 7") as exc:
        read_model_info(tmp_path / "odd.gguf")
    assert exc.value.code == ErrorCode.MODEL_INVALID
    # the same tensor as blk.0 is a fine one-block file
    (tmp_path / "ok.gguf").write_bytes(body.replace(b"blk.7.x", b"blk.0.x"))
    assert read_model_info(tmp_path / "ok.gguf").layer_bytes == (32,)


# ---------------------------------------------------------------------------------------- the probe's parts


def test_llama_cpp_log_lines_give_layers_and_buffers():
    lines = [
        "load_tensors: offloading output layer to GPU\n",
        "load_tensors: offloaded 9/9 layers to GPU\n",
        "load_tensors:        CUDA0 model buffer size =    47.25 MiB\n",
        "load_tensors:   CPU_Mapped model buffer size =    28.69 MiB\n",
        "llama_kv_cache:      CUDA0 KV buffer size =    96.00 MiB\n",
        "llama_context:  CUDA_Host  output buffer size =     0.38 MiB\n",
        "llama_context:      CUDA0 compute buffer size =   100.25 MiB\n",
        "llama_context:  CUDA_Host compute buffer size =     9.01 MiB\n",
    ]
    assert gpu.offloaded_layers(lines) == 9 and gpu.offloaded_layers(["nothing here"]) is None
    sizes = gpu.buffer_sizes(lines)
    assert sizes["CUDA0 model"] == int(47.25 * 2**20) and sizes["CUDA0 KV"] == 96 << 20
    assert sizes["CPU_Mapped model"] == int(28.69 * 2**20)
    on_gpu = sum(v for k, v in sizes.items() if not gpu.is_host_buffer(k))
    assert on_gpu == int(47.25 * 2**20) + (96 << 20) + int(100.25 * 2**20)


def test_fault_hook_switches():
    assert gpu.faults({"LAMABUS_GPU_FAULT": "fake:2048:4096, load-fail"}) == {"fake": "2048:4096", "load-fail": ""}
    assert gpu.faults({}) == {}
    dev = gpu._fake_device("2048:4096")
    assert (dev.free_bytes, dev.total_bytes) == (2048 << 20, 4096 << 20)


def test_a_cpu_build_is_known_from_its_library_folder(tmp_path: Path):
    (tmp_path / "libggml-base.so").write_bytes(b"")
    (tmp_path / "libggml-cpu.so").write_bytes(b"")
    env = {"LLAMA_CPP_LIB_PATH": str(tmp_path)}
    assert "no GPU backend" in (gpu._cpu_only_build(env) or "")
    (tmp_path / "libggml-cuda.so").write_bytes(b"")
    assert gpu.gpu_libraries(tmp_path) == ["libggml-cuda.so"] and gpu._cpu_only_build(env) is None


def test_the_probe_child_answers_on_this_build():
    # The child itself (the parent skips it on a CPU build): one JSON line, whatever the build.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LAMABUS_GPU_FAULT", None)
    out = subprocess.run([sys.executable, "-m", "engine.gpu"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120, check=True).stdout
    probe = msgspec.json.decode(out.strip().splitlines()[-1], type=GpuProbe)
    assert probe.source in ("ggml", "nvidia-smi")
    if not probe.backend:
        assert probe.devices == () and "no GPU backend" in probe.reason


def test_a_crashing_probe_is_a_reason_not_a_crash():
    probe = asyncio.run(gpu.probe(sys.executable, {"LAMABUS_GPU_FAULT": "probe-crash"}))
    assert probe.devices == () and not probe.backend
    assert "GPU probe failed" in probe.reason and "signal 6" in probe.reason
    fake = asyncio.run(gpu.probe(sys.executable, {"LAMABUS_GPU_FAULT": "fake:1024"}))
    assert fake.free_bytes == 1 << 30 and fake.source == "fault hook"
    assert json.loads(msgspec.json.encode(fake))["devices"][0]["freeBytes"] == 1 << 30


def test_nvidia_smi_answers_for_free_vram_where_ggml_cannot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert gpu.nvidia_smi() == [] or os.path.exists("/usr/bin/nvidia-smi")  # none on a CPU machine
    # nvidia-smi's CSV (--query-gpu=index,name,memory.total,memory.free --format=csv,noheader,nounits), MiB
    exe = tmp_path / "nvidia-smi"
    exe.write_text("#!/bin/sh\necho '0, NVIDIA H200, 143771, 142913'\necho 'No devices were found, oops'\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert gpu.nvidia_smi() == [GpuDevice("CUDA0", "NVIDIA H200", 143771 << 20, 142913 << 20)]
