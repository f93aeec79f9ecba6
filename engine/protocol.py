"""The pipe protocol between :class:`engine.runtime.Engine` and ``python -m engine.worker``.

Frames are a 4-byte big-endian length followed by one msgpack-encoded tagged
Struct. Commands flow parent -> worker on the worker's stdin; events flow
worker -> parent on a private copy of the worker's stdout (fd 1 itself is
pointed at stderr inside the worker so that stray C prints cannot corrupt the
stream). Each direction has one Encoder and one Decoder, built once.

Generations are addressed by ``gid``, a per-worker integer the parent assigns;
the caller's ``request_id`` stays on the parent side, so a request id may be
reused the moment its previous generation has ended.

Both ends cut frames with :class:`FrameReader` (the parent from an asyncio stream,
the worker from a blocking fd) and the worker writes with :class:`FrameWriter`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, Union

import msgspec

from engine.gpu import GpuDevice
from engine.types import GenerateRequest, GenerationResult, KvCacheConfig, ModelConfig
from wire.params import SamplingParams
from wire.decoding import decode_untrusted

HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20


class _Msg(msgspec.Struct, frozen=True, tag_field="t", array_like=False):
    pass


# ---- parent -> worker -------------------------------------------------------


class Load(_Msg, tag="load"):
    config: ModelConfig
    # n_gpu_layers actually requested after the parent's own checks (GPU retry lives in the worker)
    log_level: int = 3  # llama.cpp ggml_log_level at or above which log lines are forwarded to stderr
    kv_cache: KvCacheConfig | None = None  # evicted sequences' KV states in RAM / on disk (None: off)
    # the longest a decoded token's text is held so that tokens decoded close together go out as one
    # Chunk (seconds; 0: each token alone); a generation's first text and its end are never held
    token_batch_s: float = 0.0


class Generate(_Msg, tag="gen"):
    gid: int
    request: GenerateRequest


class Check(_Msg, tag="check"):
    """Compile ``sampling``'s grammar or schema and throw it away: answered ``Checked`` or ``Failed``.

    Lets a caller refuse a bad grammar before it announces anything (the assistant's
    ``generation.started``), with llama.cpp's own parser, inside this crash-isolated process."""

    gid: int
    sampling: SamplingParams


class Cancel(_Msg, tag="cancel"):
    gid: int


class Shutdown(_Msg, tag="shutdown"):
    pass


class Crash(_Msg, tag="crash"):
    """Test hook: make the worker die the way a native crash would (``signal`` number)."""

    signal: int


Command = Union[Load, Generate, Check, Cancel, Shutdown, Crash]


# ---- worker -> parent -------------------------------------------------------


class Loaded(_Msg, tag="loaded"):
    pid: int
    llama_cpp_version: str
    system_info: str
    supports_gpu_offload: bool
    n_gpu_layers_requested: int
    n_gpu_layers_used: int
    reason_no_gpu: str | None
    n_ctx_seq: int
    n_seq_max: int
    n_batch: int
    n_threads: int
    chat_template_source: str  # "gguf" or "chatml-fallback"
    chat_template_note: str | None
    load_seconds: float
    model_bytes: int
    n_params: int
    # Added with issue 22: what the GPU really got (engine/gpu.py).
    gpu_devices: tuple[GpuDevice, ...] = ()  # each GPU ggml sees, its memory as of just after the load
    vram_used_bytes: int | None = None  # the devices' free memory before the load minus after it
    buffers: dict[str, int] = {}  # llama.cpp's "<buffer> <model|KV|compute>" sizes, bytes
    gpu_fallback: bool = False  # a load with GPU layers failed and this one runs on the CPU


class LoadFailed(_Msg, tag="load_failed"):
    code: str
    message: str
    details: dict[str, Any] = {}


class Chunk(_Msg, tag="chunk"):
    gid: int
    text: str
    channel: str = "content"


class Started(_Msg, tag="started"):
    """The generation got a sequence slot; prompt evaluation begins."""

    gid: int
    seq: int
    prompt_tokens: int
    cached_tokens: int
    dropped_turns: int = 0
    truncated: bool = False


class Checked(_Msg, tag="checked"):
    """The grammar of ``Check`` ``gid`` compiled."""

    gid: int


class Done(_Msg, tag="done"):
    gid: int
    result: GenerationResult


class Failed(_Msg, tag="failed"):
    gid: int
    code: str
    message: str
    details: dict[str, Any] = {}


class Stats(_Msg, tag="stats"):
    """Sent after each generation ends: slot occupancy, for diagnostics."""

    active: int
    queued: int
    slots: list[dict[str, Any]]
    kv_moves: int = 0  # sequences moved to another id to keep the running ones consecutive (Worker.compact)
    # The saved KV states (engine/kv_cache.py KvStates.stats): bytes held, hits, misses, restored tokens.
    kv_cache: dict[str, int] = {}


Event = Union[Loaded, LoadFailed, Chunk, Started, Checked, Done, Failed, Stats]

command_encoder = msgspec.msgpack.Encoder()
command_decoder = msgspec.msgpack.Decoder(Command)
event_encoder = msgspec.msgpack.Encoder()
event_decoder = msgspec.msgpack.Decoder(Event)


def decode_command(body: bytes | memoryview) -> Command:
    """A frame body from the parent; a corrupt one is a ``bad_request`` LamaError (the pipe is then closed)."""
    return decode_untrusted(command_decoder, body)


def decode_event(body: bytes | memoryview) -> Event:
    """A frame body from a worker; a corrupt one is a ``bad_request`` LamaError (the worker is then killed)."""
    return decode_untrusted(event_decoder, body)


def frame(encoder: msgspec.msgpack.Encoder, msg: msgspec.Struct) -> bytes:
    body = encoder.encode(msg)
    return HEADER.pack(len(body)) + body


T = TypeVar("T")


class FrameReader(Generic[T]):
    """Bytes in as they arrive, whole decoded frames out; a partial frame waits for the rest.

    Reading whatever the pipe holds and cutting every complete frame from it costs one
    wake-up per write of the other end (the worker writes all of a decode step's events
    at once), not one per frame.
    """

    def __init__(self, decode: Callable[[memoryview], T]) -> None:
        self._decode = decode
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[T]:
        """The frames ``data`` completes, decoded one by one as they are taken.

        Lazily, so that a corrupt frame raises only after the frames before it were handled.
        """
        self._buf += data
        return self._frames()

    def _frames(self) -> Iterator[T]:
        buf = self._buf
        unpack, hsize, decode = HEADER.unpack_from, HEADER.size, self._decode
        pos, end = 0, len(buf)
        try:
            while end - pos >= hsize:
                (n,) = unpack(buf, pos)
                if n > MAX_FRAME:
                    raise ValueError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
                if end - pos - hsize < n:
                    break
                # the view dies with the decode, so the buffer can be trimmed below
                msg = decode(memoryview(buf)[pos + hsize : pos + hsize + n])
                pos += hsize + n
                yield msg
        finally:
            del buf[:pos]


class FrameWriter:
    """Frames collected during a step and written in one go (one wake-up for the reader)."""

    def __init__(self, fd: int, encoder: msgspec.msgpack.Encoder) -> None:
        self.fd = fd
        self._encode = encoder.encode
        self._out: list[bytes] = []

    def add(self, msg: msgspec.Struct) -> None:
        body = self._encode(msg)
        self._out.append(HEADER.pack(len(body)))
        self._out.append(body)

    def flush(self) -> None:
        if not self._out:
            return
        data = memoryview(b"".join(self._out))
        self._out.clear()
        while data:
            n = os.write(self.fd, data)
            data = data[n:]
