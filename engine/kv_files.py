"""The keys and the file format of saved KV states (engine/kv_cache.py keeps them in RAM and on disk).

A state is keyed by its model and load parameters (:func:`model_dir_key`: the model file's SHA-256, the
resolved load config and the llama.cpp version, since the state's layout depends on all three; the
directory) and by its exact tokens (:func:`state_key`, their SHA-256; the file name). A file is
``MAGIC``, a JSON header (model key, token count, byte count, CRC-32), the tokens as int32 and the state's
bytes; :func:`read_header` checks all of it and raises :class:`BadFile` saying what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import zlib
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("engine.kv_cache")

MAGIC = b"LAMAKV01"
_HEAD = struct.Struct("<8sI")  # magic, length of the JSON header that follows
_MAX_HEADER = 1 << 16
SUFFIX = ".kv"


def tokens_bytes(tokens: Iterable[int]) -> bytes:
    """Tokens as little-endian int32: the key's input, the file's token block, the prefix comparison."""
    a = array("i", tokens)
    if a.itemsize != 4:  # pragma: no cover - every platform lamabus runs on has a 4-byte C int
        raise RuntimeError("array('i') is not 4 bytes here")
    if array("i", [1]).tobytes() != b"\x01\x00\x00\x00":  # pragma: no cover - big-endian hosts
        a.byteswap()
    return a.tobytes()


def bytes_tokens(b: bytes) -> list[int]:
    a = array("i")
    a.frombytes(b)
    if array("i", [1]).tobytes() != b"\x01\x00\x00\x00":  # pragma: no cover
        a.byteswap()
    return a.tolist()


def common_prefix_bytes(a: bytes, b: bytes) -> int:
    """Tokens ``a`` and ``b`` (int32 blocks) share at the start: a binary search of slice compares
    (memcmp in C), so matching a prompt against hundreds of states costs microseconds."""
    n = min(len(a), len(b)) // 4
    if a[: n * 4] == b[: n * 4]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] holds, a[:hi] == b[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[: mid * 4] == b[: mid * 4]:
            lo = mid
        else:
            hi = mid
    return lo


def state_key(tokens: bytes) -> str:
    return hashlib.sha256(tokens).hexdigest()[:40]


def model_dir_key(model_sha256: str, params: dict[str, Any], llama_version: str) -> str:
    """The directory of one model's states: what a state's layout depends on, hashed."""
    ident = json.dumps({"model": model_sha256, "params": params, "llama": llama_version}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


# ---- the model's SHA-256, remembered across restarts ------------------------------------------


def model_sha256(path: str, cache_root: str | os.PathLike[str] | None) -> str:
    """SHA-256 of the model file. Read once per (path, size, mtime): remembered in
    ``<cache_root>/models.json`` so a restart does not read a large model again. Blocking: call it
    off the event loop."""
    st = os.stat(path)
    ident = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    known = _hashed.get(ident)
    if known is not None:
        return known
    digest = _model_sha256(path, ident, cache_root)
    _hashed[ident] = digest
    return digest


_hashed: dict[str, str] = {}  # this process's answers (engines in one process, a service's test suite)


def _model_sha256(path: str, ident: str, cache_root: str | os.PathLike[str] | None) -> str:
    memo_path = Path(cache_root) / "models.json" if cache_root is not None else None
    memo: dict[str, str] = {}
    if memo_path is not None:
        try:
            loaded = json.loads(memo_path.read_text())
            if isinstance(loaded, dict):
                memo = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, str)}
        except (OSError, ValueError):
            memo = {}
        digest = memo.get(ident)
        if digest is not None and len(digest) == 64:
            return digest
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    if memo_path is not None:
        memo[ident] = digest
        if len(memo) > 256:  # bounded: the oldest entries go (dicts keep insertion order)
            memo = dict(list(memo.items())[-256:])
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_name(f"models.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
        except OSError as exc:
            log.warning("cannot remember the model's SHA-256 in %s: %s", memo_path, exc)
    return digest


class BadFile(Exception):
    pass



def encode_header(dir_key: str, tokens: bytes, data: Any) -> bytes:
    size = memoryview(data).nbytes
    crc = zlib.crc32(data, zlib.crc32(tokens))
    header = json.dumps({"model": dir_key, "tokens": len(tokens) // 4, "bytes": size, "crc": crc}).encode()
    return _HEAD.pack(MAGIC, len(header)) + header


def read_header(f: Any, dir_key: str, file_size: int, name_key: str | None) -> tuple[bytes, int, int, int]:
    """``(tokens, data_bytes, data_offset, crc)`` of an open state file; :class:`BadFile` says why not."""
    head = f.read(_HEAD.size)
    if len(head) < _HEAD.size:
        raise BadFile("truncated before its header")
    magic, n = _HEAD.unpack(head)
    if magic != MAGIC:
        raise BadFile("not a lamabus KV state file")
    if n > _MAX_HEADER:
        raise BadFile("header too long")
    raw = f.read(n)
    if len(raw) < n:
        raise BadFile("truncated in its header")
    try:
        h = json.loads(raw)
        model, n_tokens, n_bytes, crc = h["model"], h["tokens"], h["bytes"], h["crc"]
    except (ValueError, KeyError, TypeError):
        raise BadFile("unreadable header") from None
    if not (isinstance(model, str) and all(type(x) is int and x >= 0 for x in (n_tokens, n_bytes, crc))):
        raise BadFile("unreadable header")
    if model != dir_key:
        raise BadFile("a state of another model or load configuration")
    offset = _HEAD.size + n + 4 * n_tokens
    if file_size != offset + n_bytes:
        raise BadFile(f"{file_size} bytes where {offset + n_bytes} were written (truncated or appended to)")
    tokens = f.read(4 * n_tokens)
    if len(tokens) < 4 * n_tokens:
        raise BadFile("truncated in its tokens")
    if name_key is not None and state_key(tokens) != name_key:
        raise BadFile("its tokens do not match its name")
    return tokens, n_bytes, offset, crc
