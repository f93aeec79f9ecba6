"""Read GGUF metadata without loading weights (the seed's ``loadLlamaModelInfo``).

A GGUF file is a header of typed key/value pairs followed by tensor infos and
the tensor data. We read only the header and tensor infos, so a 4 GB model is
inspected in milliseconds and a corrupt file is diagnosed before llama.cpp
(which may abort the process on bad input) ever sees it.
"""

from __future__ import annotations

import os
import struct
from typing import Any, BinaryIO

import msgspec

from wire.errors import ErrorCode, LamaError

GGUF_MAGIC = b"GGUF"
_ALIGNMENT_DEFAULT = 32

# GGUF value types (gguf.h)
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9

# ggml_type -> (block size in elements, bytes per block); enough to size every tensor.
_GGML_TYPE_SIZE: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
}

# general.file_type (llama_ftype) -> the name people use for the quantization.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}

# Arrays we skip rather than materialise (the vocabulary is 50k+ strings).
_SKIP_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}


class ModelInfo(msgspec.Struct, frozen=True, rename="camel"):
    path: str
    size: int
    architecture: str
    name: str | None
    context_length: int | None
    quantization: str | None
    parameter_count: int
    chat_template: str | None
    embedding_length: int | None
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None
    vocab_size: int | None
    tensor_count: int
    tensor_data_bytes: int


class _Reader:
    def __init__(self, f: BinaryIO, path: str) -> None:
        self.f = f
        self.path = path

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise LamaError(ErrorCode.MODEL_INVALID, f"{self.path}: GGUF header is truncated", path=self.path)
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > 1 << 26:
            raise LamaError(ErrorCode.MODEL_INVALID, f"{self.path}: implausible string length {n}", path=self.path)
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool = True) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype = self.scalar("<I")
            n = self.scalar("<Q")
            if n > 1 << 28:
                raise LamaError(ErrorCode.MODEL_INVALID, f"{self.path}: implausible array length {n}", path=self.path)
            if not keep and itype in _SCALARS:
                self.read(n * struct.calcsize(_SCALARS[itype]))
                return n
            items = [self.value(itype, keep) for _ in range(n)]
            return items if keep else n
        raise LamaError(ErrorCode.MODEL_INVALID, f"{self.path}: unknown GGUF value type {vtype}", path=self.path)


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Inspect a GGUF file; raise ``model_file_missing`` or ``model_invalid`` with the reason."""
    path = os.fspath(path)
    try:
        size = os.stat(path).st_size
        f = open(path, "rb")
    except FileNotFoundError:
        raise LamaError(ErrorCode.MODEL_FILE_MISSING, f"model file not found: {path}", path=path) from None
    except IsADirectoryError:
        raise LamaError(ErrorCode.MODEL_INVALID, f"not a file: {path}", path=path) from None
    except OSError as exc:
        raise LamaError(ErrorCode.MODEL_FILE_MISSING, f"cannot open model file {path}: {exc.strerror}", path=path) from None
    with f:
        if size == 0:
            raise LamaError(ErrorCode.MODEL_INVALID, f"{path}: file is empty", path=path)
        r = _Reader(f, path)
        if f.read(4) != GGUF_MAGIC:
            raise LamaError(ErrorCode.MODEL_INVALID, f"{path}: not a GGUF file (bad magic)", path=path)
        version = r.scalar("<I")
        if version not in (2, 3):
            raise LamaError(ErrorCode.MODEL_INVALID, f"{path}: unsupported GGUF version {version}", path=path)
        n_tensors = r.scalar("<Q")
        n_kv = r.scalar("<Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise LamaError(ErrorCode.MODEL_INVALID, f"{path}: implausible header counts", path=path)
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            vtype = r.scalar("<I")
            meta[key] = r.value(vtype, keep=key not in _SKIP_ARRAYS)
        params = 0
        data_end = 0
        for _ in range(n_tensors):
            r.string()
            n_dims = r.scalar("<I")
            if n_dims > 8:
                raise LamaError(ErrorCode.MODEL_INVALID, f"{path}: tensor with {n_dims} dimensions", path=path)
            dims = [r.scalar("<Q") for _ in range(n_dims)]
            ggml_type = r.scalar("<I")
            offset = r.scalar("<Q")
            elements = 1
            for d in dims:
                elements *= d
            params += elements
            block, nbytes = _GGML_TYPE_SIZE.get(ggml_type, (1, 0))
            data_end = max(data_end, offset + elements // block * nbytes)
        alignment = int(meta.get("general.alignment", _ALIGNMENT_DEFAULT))
        header_end = f.tell()
        data_start = (header_end + alignment - 1) // alignment * alignment
        if data_start + data_end > size:
            raise LamaError(
                ErrorCode.MODEL_INVALID,
                f"{path}: tensor data is cut off ({size} bytes on disk, {data_start + data_end} expected)",
                path=path,
                expected_size=data_start + data_end,
                size=size,
            )
    arch = str(meta.get("general.architecture", "unknown"))
    ftype = meta.get("general.file_type")
    vocab = meta.get("tokenizer.ggml.tokens")
    return ModelInfo(
        path=path,
        size=size,
        architecture=arch,
        name=meta.get("general.name"),
        context_length=meta.get(f"{arch}.context_length"),
        quantization=_FILE_TYPES.get(ftype) if isinstance(ftype, int) else None,
        parameter_count=params,
        chat_template=meta.get("tokenizer.chat_template"),
        embedding_length=meta.get(f"{arch}.embedding_length"),
        block_count=meta.get(f"{arch}.block_count"),
        head_count=meta.get(f"{arch}.attention.head_count"),
        head_count_kv=meta.get(f"{arch}.attention.head_count_kv"),
        vocab_size=vocab if isinstance(vocab, int) else None,
        tensor_count=n_tensors,
        tensor_data_bytes=data_end,
    )
