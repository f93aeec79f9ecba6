"""Model files: hashing them off the event loop, with progress and a way to stop.

The registry hashes a file it imports (its SHA-256 is the model's checksum), the
catalogue a file it downloads; both run the blocking work in a thread.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any, Callable

import anyio

from wire.errors import ErrorCode, LamaError

ProgressCallback = Callable[[int, "int | None"], None]
"""``(bytes_done, bytes_total)``; called from a worker thread, so keep it thread-safe (rich's Progress is)."""

_HASH_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str], progress: ProgressCallback | None = None,
                stop: threading.Event | None = None) -> str:
    """Blocking; run it in a thread (``hash_file``). ``stop`` aborts between chunks."""
    digest = hashlib.sha256()
    total = os.stat(path).st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            if stop is not None and stop.is_set():
                raise LamaError(ErrorCode.CANCELLED, f"hashing {path} was cancelled")
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


async def run_in_thread(fn: Callable[..., Any], *args: Any, stop: threading.Event | None = None) -> Any:
    """Run blocking work off the event loop; on cancellation, ask it to stop and return at once."""
    stop = stop or threading.Event()
    try:
        return await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    finally:
        stop.set()


async def hash_file(path: str | os.PathLike[str], progress: ProgressCallback | None = None) -> str:
    stop = threading.Event()
    return await run_in_thread(sha256_file, path, progress, stop, stop=stop)
