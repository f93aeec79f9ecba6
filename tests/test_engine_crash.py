"""Crash isolation: workers that die (SIGSEGV, SIGKILL, at load or mid-generation) and files llama.cpp rejects.

Each case gets a clear LamaError and the engine keeps serving with a fresh worker.
"""

from __future__ import annotations

import os
import signal
import stat
import struct
from pathlib import Path

import pytest

from engine.gguf import read_model_info
from engine.runtime import Engine
from engine.types import ChatTurn, GenerateRequest, GenerationResult, ModelConfig
from wire.errors import ErrorCode, LamaError
from wire.params import GenerationParams, SamplingParams

pytestmark = [pytest.mark.model]

CONFIG = dict(n_ctx=256, n_batch=128, n_seq_max=2)


def req(rid: str, max_tokens: int = 4, ignore_eos: bool = False) -> GenerateRequest:
    s = SamplingParams.resolve(GenerationParams(temperature=0.0, max_tokens=max_tokens, stop=["\n\n\n"]))
    return GenerateRequest(rid, s, messages=(ChatTurn("user", "Tell me a story."),), ignore_eos=ignore_eos)


def pid_of(engine: Engine) -> int:
    return engine.diagnostics()["models"][0]["worker"]["pid"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
async def test_worker_killed_mid_generation(model_path: Path, sig: signal.Signals):
    async with Engine() as engine:
        h = await engine.initialize(ModelConfig(str(model_path), **CONFIG))
        pid = pid_of(engine)
        seen = 0
        with pytest.raises(LamaError) as exc:
            async for item in engine.generate_stream(h, req("doomed", max_tokens=5000, ignore_eos=True)):
                assert not isinstance(item, GenerationResult)
                seen += 1
                if seen == 2:
                    os.kill(pid, sig)
        assert exc.value.code == ErrorCode.INTERNAL
        assert sig.name in exc.value.message
        # the same handle works again, on a fresh worker
        result = await engine.generate(h, req("next"))
        assert result.tokens > 0
        d = engine.diagnostics()["models"][0]["worker"]
        assert d["pid"] != pid and d["alive"] and d["restarts"] == 1 and d["lastExit"] == sig.name


@pytest.mark.slow
async def test_worker_killed_while_idle_restarts_on_next_request(model_path: Path):
    async with Engine() as engine:
        h = await engine.initialize(ModelConfig(str(model_path), **CONFIG))
        pid = pid_of(engine)
        os.kill(pid, signal.SIGKILL)
        result = await engine.generate(h, req("after-idle-kill"))
        assert result.tokens > 0 and pid_of(engine) != pid


@pytest.mark.slow
async def test_worker_dying_during_load_is_model_load_failed(tmp_path: Path, model_path: Path):
    crasher = tmp_path / "crashing-python"
    crasher.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crasher.chmod(crasher.stat().st_mode | stat.S_IEXEC)
    async with Engine(worker_python=str(crasher)) as engine:
        with pytest.raises(LamaError) as exc:
            await engine.initialize(ModelConfig(str(model_path), **CONFIG))
        assert exc.value.code == ErrorCode.MODEL_LOAD_FAILED
        assert "SIGSEGV" in exc.value.message
        assert engine.diagnostics()["workers"] == 0
    async with Engine() as engine:  # a real worker still loads fine
        h = await engine.initialize(ModelConfig(str(model_path), **CONFIG))
        assert (await engine.generate(h, req("ok"))).tokens > 0


def _corrupt_tensor_type(src: Path, dst: Path) -> None:
    """Copy the model with the first tensor's ggml type set to a value no llama.cpp knows."""
    data = bytearray(src.read_bytes())
    info = read_model_info(src)
    # walk to the first tensor info: we know the header ends where tensor infos begin; find the first
    # tensor name ("token_embd.weight" in llama models) after the metadata.
    name = b"token_embd.weight"
    i = data.index(struct.pack("<Q", len(name)) + name, 0, info.tensor_data_offset)
    p = i + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, p)
    p += 4 + 8 * n_dims
    struct.pack_into("<I", data, p, 1234)
    dst.write_bytes(bytes(data))


@pytest.mark.slow
async def test_file_llama_rejects_is_model_load_failed_and_engine_keeps_serving(tmp_path: Path, model_path: Path):
    bad = tmp_path / "bad-type.gguf"
    _corrupt_tensor_type(model_path, bad)
    async with Engine() as engine:
        with pytest.raises(LamaError) as exc:
            await engine.initialize(ModelConfig(str(bad), **CONFIG))
        # our header reader sizes unknown types as 0 bytes (newer llama.cpp types stay loadable);
        # llama.cpp rejects it, and its own reason reaches the caller
        assert exc.value.code == ErrorCode.MODEL_LOAD_FAILED
        assert "invalid ggml type" in exc.value.message
        h = await engine.initialize(ModelConfig(str(model_path), **CONFIG))
        assert (await engine.generate(h, req("fine"))).tokens > 0


async def test_every_bad_file_has_its_own_code_and_the_engine_keeps_serving(tmp_path: Path, model_path: Path):
    zero = tmp_path / "zero.gguf"
    zero.write_bytes(b"")
    text = tmp_path / "text.gguf"
    text.write_text("not a model at all\n" * 50)
    short = tmp_path / "short.gguf"
    short.write_bytes(model_path.read_bytes()[:1000])
    rnd = tmp_path / "random.gguf"
    rnd.write_bytes(b"GGUF" + os.urandom(100_000))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model_path.read_bytes()[: os.path.getsize(model_path) - 4096])
    cases = {
        tmp_path / "missing.gguf": ErrorCode.MODEL_FILE_MISSING,
        zero: ErrorCode.MODEL_INVALID,
        text: ErrorCode.MODEL_INVALID,
        short: ErrorCode.MODEL_INVALID,
        rnd: ErrorCode.MODEL_INVALID,
        cut: ErrorCode.MODEL_INVALID,
    }
    async with Engine() as engine:
        h = await engine.initialize(ModelConfig(str(model_path), **CONFIG))
        for path, code in cases.items():
            with pytest.raises(LamaError) as exc:
                await engine.initialize(ModelConfig(str(path), **CONFIG))
            assert exc.value.code == code, (path.name, exc.value)
            assert str(path.name) in exc.value.message
        assert (await engine.generate(h, req("still-serving"))).tokens > 0
        assert engine.diagnostics()["workers"] == 1
