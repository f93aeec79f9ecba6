"""Engine pieces that need no llama.cpp: history fitting, memory prediction/probing, protocol, early errors."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from engine.chat import fit_messages
from engine.gguf import read_model_info
from engine.memory import MemoryAvailable, _cgroup_available, available_memory, fits, predict_memory
from engine.protocol import Done, Generate, command_decoder, command_encoder, event_decoder, event_encoder
from engine.runtime import Engine
from engine.types import ChatTurn, GenerateRequest, GenerationResult, ModelConfig
from wire.errors import ErrorCode, LamaError
from wire.messages import Timing, Usage
from wire.params import SamplingParams


# ---- history fitting with a word tokenizer ---------------------------------------------


def render(turns) -> str:
    return "".join(f"[{t.role}] {t.content} " for t in turns) + "[assistant]"


def tokenize(text: str) -> list[int]:
    return [hash(w) & 0xFFFF for w in text.split()]


def detokenize(tokens: list[int]) -> str:
    return " ".join("w" for _ in tokens)


def fit(turns, budget):
    return fit_messages(turns, budget, render=render, tokenize=tokenize, detokenize=detokenize)


def words(n: int) -> str:
    return " ".join(["w"] * n)


def test_fits_unchanged():
    turns = [ChatTurn("system", "be nice"), ChatTurn("user", "hello there")]
    f = fit(turns, 100)
    assert (f.dropped_turns, f.truncated) == (0, False)
    assert f.text == render(turns)


def test_drops_oldest_non_system_turns_first():
    turns = [
        ChatTurn("system", "sys"),
        ChatTurn("user", words(20)),
        ChatTurn("assistant", words(20)),
        ChatTurn("user", "last question"),
    ]
    f = fit(turns, 30)  # dropping the first user turn is enough
    assert f.dropped_turns == 1 and not f.truncated
    assert f.text == render([turns[0], turns[2], turns[3]])
    f = fit(turns, 20)
    assert f.dropped_turns == 2 and not f.truncated
    assert f.text == render([turns[0], turns[3]])
    assert len(f.tokens) <= 20


def test_truncates_the_one_long_turn_in_the_middle():
    turns = [ChatTurn("system", "sys"), ChatTurn("user", "START " + words(200) + " END")]
    f = fit(turns, 50)
    assert f.truncated and len(f.tokens) <= 50
    assert "[system] sys" in f.text


def test_context_overflow_when_nothing_can_help():
    turns = [ChatTurn("user", "hi")]
    with pytest.raises(LamaError) as exc:
        fit(turns, 1)
    assert exc.value.code == ErrorCode.CONTEXT_OVERFLOW


def test_empty_messages_is_bad_request():
    with pytest.raises(LamaError) as exc:
        fit([], 10)
    assert exc.value.code == ErrorCode.BAD_REQUEST


# ---- memory --------------------------------------------------------------------------


def test_prediction_counts_weights_kv_and_compute(model_path: Path):
    info = read_model_info(model_path)
    cfg = ModelConfig(str(model_path), n_ctx=2048, n_seq_max=2)
    p = predict_memory(info, cfg)
    assert p.weights_bytes == info.tensor_data_bytes
    # 30 layers x 4096 cells x (192 + 192) x 2 bytes
    assert p.kv_cache_bytes == 30 * 4096 * 384 * 2
    assert p.total_bytes == p.weights_bytes + p.kv_cache_bytes + p.compute_bytes
    bigger = predict_memory(info, ModelConfig(str(model_path), n_ctx=8192, n_seq_max=2))
    assert bigger.kv_cache_bytes == 4 * p.kv_cache_bytes
    assert fits(p, MemoryAvailable(p.total_bytes * 2, "test"))
    assert not fits(p, MemoryAvailable(p.total_bytes, "test"))


def test_available_memory_is_positive_and_named():
    avail = available_memory()
    assert avail.bytes > 0 and avail.source


def test_cgroup_v2_limit(tmp_path: Path, monkeypatch):
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("250000\n")
    real_read = Path.read_text

    def fake_read(self, *a, **k):
        if str(self) == "/proc/self/cgroup":
            return "0::/\n"
        return real_read(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", fake_read)
    assert _cgroup_available(tmp_path) == (750000, f"cgroup v2 {tmp_path}")
    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_available(tmp_path) is None


# ---- protocol ------------------------------------------------------------------------


def test_protocol_roundtrip():
    req = GenerateRequest(
        "r1", SamplingParams.resolve(), messages=(ChatTurn("user", "hi"),), conversation="topic-1"
    )
    cmd = command_decoder.decode(command_encoder.encode(Generate(7, req)))
    assert cmd == Generate(7, req)
    result = GenerationResult("a", "", 1, "stop", Timing(1, 2, 1, 1, 1), Usage(1, 1, 2, 0))
    assert event_decoder.decode(event_encoder.encode(Done(7, result))) == Done(7, result)


# ---- engine errors that happen before any worker starts ----------------------------------


async def _init_error(engine: Engine, config: ModelConfig) -> LamaError:
    with pytest.raises(LamaError) as exc:
        await engine.initialize(config)
    return exc.value


async def test_bad_files_fail_before_loading(tmp_path: Path, model_path: Path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a model" * 100)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model_path.read_bytes()[: 20_000_000])
    async with Engine() as engine:
        assert (await _init_error(engine, ModelConfig(str(tmp_path / "missing.gguf")))).code == ErrorCode.MODEL_FILE_MISSING
        assert (await _init_error(engine, ModelConfig(str(empty)))).code == ErrorCode.MODEL_INVALID
        assert (await _init_error(engine, ModelConfig(str(junk)))).code == ErrorCode.MODEL_INVALID
        assert (await _init_error(engine, ModelConfig(str(cut)))).code == ErrorCode.MODEL_INVALID
        assert engine.diagnostics()["workers"] == 0


async def test_out_of_memory_is_predicted_before_loading(model_path: Path):
    # Too little even for one sequence: the weights and compute buffers alone do not fit.
    async with Engine(memory_probe=lambda: MemoryAvailable(200 << 20, "pretend")) as engine:
        err = await _init_error(engine, ModelConfig(str(model_path)))
        assert err.code == ErrorCode.OUT_OF_MEMORY
        assert err.details["available"] == 200 << 20
        assert "pretend" in err.message
        assert engine.diagnostics()["workers"] == 0


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [("n_ctx", 1, "nCtx"), ("n_batch", 0, "nBatch"), ("n_threads", 0, "nThreads"), ("n_seq_max", 65, "nSeqMax")],
)
async def test_bad_config_names_the_field(model_path: Path, field, value, named):
    async with Engine() as engine:
        err = await _init_error(engine, msgspec.structs.replace(ModelConfig(str(model_path)), **{field: value}))
        assert err.code == ErrorCode.BAD_REQUEST
        assert named in err.details["field"]


async def test_unknown_handle_is_not_found():
    async with Engine() as engine:
        with pytest.raises(LamaError) as exc:
            await engine.release("ctx-nope")
        assert exc.value.code == ErrorCode.NOT_FOUND
        req = GenerateRequest("r", SamplingParams.resolve(), prompt="hi")
        with pytest.raises(LamaError) as exc:
            await engine.generate("ctx-nope", req)
        assert exc.value.code == ErrorCode.NOT_FOUND
        assert await engine.cancel("r") is False


async def test_model_info_off_loop(model_path: Path):
    async with Engine() as engine:
        info = await engine.model_info(str(model_path))
        assert info.architecture == "llama"


async def test_aclose_is_idempotent():
    engine = Engine()
    await engine.aclose()
    await engine.aclose()
    with pytest.raises(LamaError):
        await engine.initialize(ModelConfig("/nonexistent"))


def test_amx_build_is_refused():
    from engine.worker import check_build

    check_build("CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | OPENMP = 1 |")
    with pytest.raises(LamaError, match="GGML_NATIVE=OFF") as exc:
        check_build("CPU : AVX512 = 1 | AMX_INT8 = 1 | OPENMP = 1 |")
    assert exc.value.code == ErrorCode.MODEL_LOAD_FAILED


@pytest.mark.model
async def test_fewer_parallel_sequences_when_all_do_not_fit(model_path: Path):
    info = read_model_info(model_path)
    two = predict_memory(info, ModelConfig(str(model_path), n_seq_max=2)).total_bytes
    four = predict_memory(info, ModelConfig(str(model_path), n_seq_max=4)).total_bytes
    room = (two + four) // 2 + (64 << 20)  # enough for 2 sequences (with headroom), not for 4
    async with Engine(memory_probe=lambda: MemoryAvailable(room, "pretend")) as engine:
        handle = await engine.initialize(ModelConfig(str(model_path), n_seq_max=8))
        (model,) = engine.diagnostics()["models"]
        assert model["config"]["nSeqMax"] == 2 and model["nSeqMaxRequested"] == 8
        result = await engine.generate(handle, GenerateRequest(
            "r1", SamplingParams.resolve(), messages=(ChatTurn("user", "Hi"),)))
        assert result.tokens > 0
