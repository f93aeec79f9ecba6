"""engine.gguf: header-only model info, and a precise diagnosis of broken files."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from engine.gguf import read_model_info
from wire.errors import ErrorCode, LamaError


def _code(path) -> ErrorCode:
    with pytest.raises(LamaError) as exc:
        read_model_info(path)
    return exc.value.code


def test_bundled_model_info(model_path: Path):
    info = read_model_info(model_path)
    assert info.architecture == "llama"
    assert info.quantization == "Q4_1"
    assert info.context_length == 8192
    assert info.block_count == 30 and info.embedding_length == 576
    assert info.head_count == 9 and info.head_count_kv == 3
    assert info.n_embd_k_gqa == 192 == info.n_embd_v_gqa
    assert info.vocab_size == 49152
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert info.bos_token == "<|im_start|>" and info.eos_token == "<|im_end|>"
    assert 130_000_000 < info.parameter_count < 140_000_000
    assert info.tensor_data_offset + info.tensor_data_bytes <= info.size == os.path.getsize(model_path)


def test_missing_file(tmp_path: Path):
    assert _code(tmp_path / "nope.gguf") == ErrorCode.MODEL_FILE_MISSING


def test_directory(tmp_path: Path):
    assert _code(tmp_path) == ErrorCode.MODEL_INVALID


def test_empty_file(tmp_path: Path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(LamaError, match="empty") as exc:
        read_model_info(p)
    assert exc.value.code == ErrorCode.MODEL_INVALID


def test_not_gguf(tmp_path: Path):
    p = tmp_path / "text.gguf"
    p.write_text("hello, I am not a model\n" * 10)
    with pytest.raises(LamaError, match="bad magic"):
        read_model_info(p)


def test_truncated_header(tmp_path: Path, model_path: Path):
    p = tmp_path / "short.gguf"
    p.write_bytes(model_path.read_bytes()[:5000])
    with pytest.raises(LamaError, match="truncated") as exc:
        read_model_info(p)
    assert exc.value.code == ErrorCode.MODEL_INVALID


def test_random_bytes_after_magic(tmp_path: Path):
    p = tmp_path / "random.gguf"
    p.write_bytes(b"GGUF" + os.urandom(4096))
    assert _code(p) == ErrorCode.MODEL_INVALID


def test_implausible_counts(tmp_path: Path):
    p = tmp_path / "counts.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 1) + b"\0" * 64)
    with pytest.raises(LamaError, match="implausible"):
        read_model_info(p)


def test_tensor_data_cut_off(tmp_path: Path, model_path: Path):
    p = tmp_path / "cut.gguf"
    with open(model_path, "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(os.path.getsize(model_path) // 2))
    with pytest.raises(LamaError, match="cut off") as exc:
        read_model_info(p)
    assert exc.value.code == ErrorCode.MODEL_INVALID
    assert exc.value.details["expected_size"] == os.path.getsize(model_path)


def test_minimal_handmade_gguf(tmp_path: Path):
    """A file we build byte by byte: every value type, nested arrays, one tensor."""

    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    kvs = [
        s("general.architecture") + struct.pack("<I", 8) + s("toy"),
        s("general.name") + struct.pack("<I", 8) + s("Toy"),
        s("toy.block_count") + struct.pack("<II", 4, 2),
        s("toy.embedding_length") + struct.pack("<IQ", 10, 8),
        s("toy.some_float") + struct.pack("<Id", 12, 0.5),
        s("toy.flag") + struct.pack("<I?", 7, True),
        s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + s("<s>") + s("</s>") + s("hi"),
        s("tokenizer.ggml.bos_token_id") + struct.pack("<II", 4, 0),
        s("tokenizer.ggml.eos_token_id") + struct.pack("<II", 4, 1),
        s("nested") + struct.pack("<IIQ", 9, 9, 2) + struct.pack("<IQ", 5, 2) + struct.pack("<ii", 1, 2)
        + struct.pack("<IQ", 8, 1) + s("x"),
    ]
    tensor = s("w") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 2) + struct.pack("<I", 0) + struct.pack("<Q", 0)
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs) + tensor
    pad = (-len(header)) % 32
    p = tmp_path / "toy.gguf"
    p.write_bytes(header + b"\0" * pad + b"\0" * (8 * 4))
    info = read_model_info(p)
    assert (info.architecture, info.name, info.block_count, info.embedding_length) == ("toy", "Toy", 2, 8)
    assert info.vocab_size == 3 and info.bos_token == "<s>" and info.eos_token == "</s>"
    assert info.parameter_count == 8 and info.tensor_data_bytes == 32
    p.write_bytes(header + b"\0" * pad + b"\0" * 31)
    assert _code(p) == ErrorCode.MODEL_INVALID
