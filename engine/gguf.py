"""Read GGUF metadata without loading weights (the seed's ``loadLlamaModelInfo``).

A GGUF file is a header of typed key/value pairs followed by tensor infos and
the tensor data. We read only the header and tensor infos, so a 4 GB model is
inspected in milliseconds and a corrupt file is diagnosed before llama.cpp
(which may abort the process on bad input) ever sees it.

The file is memory-mapped and walked by offset: scalar arrays are skipped by
arithmetic, string arrays (the 50k-entry vocabulary and merges) by one
``unpack_from`` per element, with no string objects built.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import msgspec

from wire.errors import ErrorCode, LamaError

GGUF_MAGIC = b"GGUF"
_ALIGNMENT_DEFAULT = 32

# GGUF value types (gguf.h): type -> struct format
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_SCALAR_STRUCTS = {t: struct.Struct(fmt) for t, fmt in _SCALARS.items()}
_STRING, _ARRAY = 8, 9
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

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

_MAX_STRING = 1 << 26
_MAX_ARRAY = 1 << 28
_MAX_COUNT = 1 << 20


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
    # Added with issue 7 (all optional, so older payloads still decode).
    gguf_version: int = 3
    key_length: int | None = None
    value_length: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    tensor_data_offset: int = 0
    # Added with issue 22 (where the weights go when layers are offloaded; llama.cpp's split):
    #: bytes of each repeating block ``blk.N.*``, by N
    layer_bytes: tuple[int, ...] = ()
    #: the output layer (``output_norm``, ``output``; the token embedding again when they are tied,
    #: as llama.cpp then duplicates it onto the output layer's device)
    output_bytes: int = 0
    #: the input layer (``token_embd``) and anything outside a block: always on the CPU in llama.cpp
    input_bytes: int = 0

    @property
    def n_embd_k_gqa(self) -> int | None:
        """K width per token per layer (head_dim_k x n_head_kv), as llama.cpp sizes the KV cache."""
        return _gqa(self, self.key_length)

    @property
    def n_embd_v_gqa(self) -> int | None:
        return _gqa(self, self.value_length)


def _gqa(info: ModelInfo, head_dim: int | None) -> int | None:
    if head_dim is None:
        if not info.embedding_length or not info.head_count:
            return None
        head_dim = info.embedding_length // info.head_count
    kv = info.head_count_kv or info.head_count
    return head_dim * kv if kv else None


def _invalid(path: str, why: str, **details: Any) -> LamaError:
    return LamaError(ErrorCode.MODEL_INVALID, f"{path}: {why}", path=path, **details)


class _Walker:
    """Offset-based reader over a memory-mapped file."""

    __slots__ = ("buf", "pos", "path", "end")

    def __init__(self, buf: mmap.mmap, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.end = len(buf)

    def need(self, n: int) -> None:
        if self.pos + n > self.end:
            raise _invalid(self.path, "GGUF header is truncated")

    def u32(self) -> int:
        self.need(4)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        self.need(8)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self) -> str:
        n = self.u64()
        if n > _MAX_STRING:
            raise _invalid(self.path, f"implausible string length {n}")
        self.need(n)
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def scalar(self, vtype: int) -> Any:
        st = _SCALAR_STRUCTS[vtype]
        self.need(st.size)
        (v,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return v

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALAR_STRUCTS:
            return self.scalar(vtype)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype = self.u32()
            n = self.u64()
            if n > _MAX_ARRAY:
                raise _invalid(self.path, f"implausible array length {n} for {key}")
            return self.skip_array(itype, n, key)
        raise _invalid(self.path, f"unknown GGUF value type {vtype} for {key}")

    def skip_array(self, itype: int, n: int, key: str) -> "_Array":
        start = self.pos
        if itype in _SCALAR_STRUCTS:
            size = _SCALAR_STRUCTS[itype].size * n
            self.need(size)
            self.pos += size
        elif itype == _STRING:
            buf, pos, end = self.buf, self.pos, self.end
            unpack = _U64.unpack_from
            try:
                for _ in range(n):
                    pos += 8 + unpack(buf, pos)[0]
            except struct.error:
                raise _invalid(self.path, "GGUF header is truncated") from None
            if pos > end:
                raise _invalid(self.path, "GGUF header is truncated")
            self.pos = pos
        elif itype == _ARRAY:
            for _ in range(n):
                sub = self.u32()
                m = self.u64()
                if m > _MAX_ARRAY:
                    raise _invalid(self.path, f"implausible array length {m} for {key}")
                self.skip_array(sub, m, key)
        else:
            raise _invalid(self.path, f"unknown GGUF array item type {itype} for {key}")
        return _Array(itype, n, start)

    def string_at_index(self, arr: "_Array", index: int) -> str | None:
        if arr.itype != _STRING or not 0 <= index < arr.length:
            return None
        saved = self.pos
        self.pos = arr.offset
        unpack, buf = _U64.unpack_from, self.buf
        pos = self.pos
        for _ in range(index):
            pos += 8 + unpack(buf, pos)[0]
        self.pos = pos
        s = self.string()
        self.pos = saved
        return s


class _Array(msgspec.Struct, frozen=True):
    itype: int
    length: int
    offset: int


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Inspect a GGUF file; raise ``model_file_missing`` or ``model_invalid`` with the reason."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise LamaError(ErrorCode.MODEL_FILE_MISSING, f"model file not found: {path}", path=path) from None
    except IsADirectoryError:
        raise LamaError(ErrorCode.MODEL_INVALID, f"not a file: {path}", path=path) from None
    except OSError as exc:
        raise LamaError(ErrorCode.MODEL_FILE_MISSING, f"cannot open model file {path}: {exc.strerror}", path=path) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise _invalid(path, "file is empty")
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise _invalid(path, f"cannot map file: {exc}") from None
        try:
            return _parse(buf, path, size)
        finally:
            buf.close()


def _parse(buf: mmap.mmap, path: str, size: int) -> ModelInfo:
    w = _Walker(buf, path)
    if size < 4 or buf[:4] != GGUF_MAGIC:
        raise _invalid(path, "not a GGUF file (bad magic)")
    w.pos = 4
    version = w.u32()
    if version not in (2, 3):
        raise _invalid(path, f"unsupported GGUF version {version}")
    n_tensors = w.u64()
    n_kv = w.u64()
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise _invalid(path, f"implausible header counts ({n_tensors} tensors, {n_kv} keys)")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = w.string()
        vtype = w.u32()
        meta[key] = w.value(vtype, key)
    params = 0
    data_end = 0
    layers: dict[int, int] = {}
    output = input_ = embd = 0
    has_output = False
    for _ in range(n_tensors):
        tname = w.string()
        n_dims = w.u32()
        if n_dims > 8:
            raise _invalid(path, f"tensor with {n_dims} dimensions")
        elements = 1
        for _ in range(n_dims):
            elements *= w.u64()
        ggml_type = w.u32()
        offset = w.u64()
        params += elements
        block, nbytes = _GGML_TYPE_SIZE.get(ggml_type, (1, 0))
        tbytes = elements // block * nbytes
        data_end = max(data_end, offset + tbytes)
        if tname.startswith("blk."):
            idx = tname[4:].partition(".")[0]
            if idx.isdigit() and len(idx) <= 7:
                if int(idx) >= n_tensors:  # every block has a tensor: a larger index is a corrupt name
                    raise _invalid(path, f"tensor {tname[:80]!r} names block {idx} of a {n_tensors}-tensor file")
                layers[int(idx)] = layers.get(int(idx), 0) + tbytes
                continue
        if tname.startswith("output"):
            output += tbytes
            has_output = has_output or tname == "output.weight"
        else:
            input_ += tbytes
            if tname == "token_embd.weight":
                embd = tbytes
    alignment = meta.get("general.alignment", _ALIGNMENT_DEFAULT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise _invalid(path, f"bad general.alignment {alignment!r}")
    data_start = (w.pos + alignment - 1) // alignment * alignment
    if data_start + data_end > size:
        raise _invalid(
            path,
            f"tensor data is cut off ({size} bytes on disk, {data_start + data_end} expected)",
            expected_size=data_start + data_end,
            size=size,
        )

    def meta_int(key: str) -> int | None:
        v = meta.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def meta_str(key: str) -> str | None:
        v = meta.get(key)
        return v if isinstance(v, str) else None

    arch = meta_str("general.architecture") or "unknown"
    ftype = meta_int("general.file_type")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = tokens.length if isinstance(tokens, _Array) else None
    bos = eos = None
    if isinstance(tokens, _Array):
        bos_id, eos_id = meta_int("tokenizer.ggml.bos_token_id"), meta_int("tokenizer.ggml.eos_token_id")
        bos = w.string_at_index(tokens, bos_id) if bos_id is not None else None
        eos = w.string_at_index(tokens, eos_id) if eos_id is not None else None
    head_count = meta.get(f"{arch}.attention.head_count")
    head_count_kv = meta.get(f"{arch}.attention.head_count_kv")
    # Per-layer head counts (some architectures) are arrays; llama.cpp sizes by the max.
    if isinstance(head_count, _Array):
        head_count = None
    if isinstance(head_count_kv, _Array):
        head_count_kv = None
    return ModelInfo(
        path=path,
        size=size,
        architecture=arch,
        name=meta_str("general.name"),
        context_length=meta_int(f"{arch}.context_length"),
        quantization=_FILE_TYPES.get(ftype) if ftype is not None else None,
        parameter_count=params,
        chat_template=meta_str("tokenizer.chat_template"),
        embedding_length=meta_int(f"{arch}.embedding_length"),
        block_count=meta_int(f"{arch}.block_count"),
        head_count=head_count if isinstance(head_count, int) else None,
        head_count_kv=head_count_kv if isinstance(head_count_kv, int) else None,
        vocab_size=vocab,
        tensor_count=n_tensors,
        tensor_data_bytes=data_end,
        gguf_version=version,
        key_length=meta_int(f"{arch}.attention.key_length"),
        value_length=meta_int(f"{arch}.attention.value_length"),
        bos_token=bos,
        eos_token=eos,
        tensor_data_offset=data_start,
        layer_bytes=tuple(layers.get(i, 0) for i in range(max(layers) + 1)) if layers else (),
        output_bytes=output + (0 if has_output else embd),
        input_bytes=input_,
    )
