"""Model files: hashing and downloading them off the event loop, with progress and a way to stop.

The registry hashes a file it imports (its SHA-256 is the model's checksum) in a
thread. ``pull`` (handlers/catalog.py) downloads one with :func:`download`: aiohttp
on the event loop, the file writes in a thread; it resumes from ``<file>.part`` with
an HTTP Range request, asks again from where a dropped connection stopped, checks
the size (and a SHA-256 it was given), and only then moves the file into place.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable

import aiohttp
import anyio

from wire.errors import ErrorCode, LamaError

ProgressCallback = Callable[[int, "int | None"], None]
"""``(bytes_done, bytes_total)``; called from a worker thread (hashing) or the event loop (downloading),
so keep it thread-safe (rich's Progress is)."""

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


# ---------------------------------------------------------------------------------------- download

_USER_AGENT = "lamabus/0.1 (+model pull)"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
#: Bytes gathered before one write to the .part file (a thread hop each) and one progress call.
_WRITE_CHUNK = 1 << 20


class _Retry(Exception):
    """A transient failure: the .part file keeps what arrived."""


def _transient(exc: BaseException) -> bool:
    """Whether asking again, from where we stopped, may well work: a dropped or timed-out connection,
    a body cut short, a refused connection (not a name that does not resolve or a bad certificate)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return isinstance(exc.os_error, (ConnectionError, TimeoutError))
    return isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ServerConnectionError, aiohttp.ClientOSError,
                            ConnectionError, TimeoutError))


def _total_from(status: int, headers: Any, offset: int) -> int | None:
    """The full file size: from Content-Range on a 206, else Content-Length of a whole-file 200."""
    if status == 206:
        m = _CONTENT_RANGE.match(headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != offset:
            raise LamaError(ErrorCode.INTERNAL, f"server answered a range request with {headers.get('Content-Range')!r}")
        return None if m.group(3) == "*" else int(m.group(3))
    length = headers.get("Content-Length")
    return int(length) if length is not None else None


def _refused(url: str, status: int, reason: str | None) -> LamaError | None:
    """The error of an HTTP status that asking again will not change (None: a server error, retry)."""
    code = ErrorCode.NOT_FOUND if status in (404, 410) else ErrorCode.BAD_REQUEST if status < 500 else None
    if code is None:
        return None
    return LamaError(code, f"download of {url} failed: HTTP {status} {reason}", url=url, status=status)


async def _append(part: Path, offset: int, body: aiohttp.StreamReader, full: int | None,
                  progress: ProgressCallback | None) -> int:
    """Write the body to ``part`` from ``offset`` on; returns the bytes it holds. The file work runs in a
    thread; what arrived before a dropped connection is written before the drop is reported."""
    done = offset
    pending: list[bytes] = []
    size = 0
    async with await anyio.open_file(part, "ab" if offset else "wb") as f:

        async def write() -> None:
            nonlocal done, pending, size
            if pending:
                await f.write(b"".join(pending))
                done += size
                pending, size = [], 0
                if progress is not None:
                    progress(done, full)

        try:
            async for chunk in body.iter_any():
                pending.append(chunk)
                size += len(chunk)
                if size >= _WRITE_CHUNK:
                    await write()
        except Exception as exc:
            if not _transient(exc):
                raise
            await write()
            raise _Retry(f"{type(exc).__name__} after {done} bytes") from None
        await write()
        await f.flush()
        await anyio.to_thread.run_sync(os.fsync, f.wrapped.fileno())
    return done


async def _download_once(session: aiohttp.ClientSession, url: str, part: Path, expected_size: int | None,
                         progress: ProgressCallback | None) -> int:
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()  # longer than the file can be: not a prefix of it
        offset = 0
    if expected_size is not None and offset == expected_size:
        return offset
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    async with session.get(url, headers=headers) as resp:
        if resp.status == 416 and offset:
            # Nothing after our offset: the .part is complete (or stale; the size/hash checks decide).
            m = _UNSATISFIED_RANGE.match(resp.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == offset:
                return offset
            part.unlink()
            raise _Retry(f"range not satisfiable at {offset}")
        if not 200 <= resp.status < 300:
            refused = _refused(url, resp.status, resp.reason)
            if refused is None:
                raise _Retry(f"HTTP {resp.status}")
            raise refused
        if offset and resp.status == 200:
            offset = 0  # the server ignored the range: start over
        full = _total_from(resp.status, resp.headers, offset)  # the whole file's size, when the server says
        if expected_size is not None and full is not None and full != expected_size:
            raise LamaError(ErrorCode.MODEL_INVALID, f"{url} is {full} bytes, expected {expected_size}",
                            url=url, size=full, expected_size=expected_size)
        done = await _append(part, offset, resp.content, full, progress)
    if full is not None and done != full:
        raise _Retry(f"connection closed after {done} of {full} bytes")
    return done


async def download(url: str, dest: Path, *, expected_size: int | None = None, expected_sha256: str | None = None,
                   progress: ProgressCallback | None = None, retries: int = 5, timeout: float = 60.0) -> str | None:
    """Download ``url`` to ``dest`` (via ``dest.part``), resuming; the file's SHA-256 when it was checked.

    A dropped connection, a timeout or a server error is asked again ``retries`` times, each
    time from where the .part file stopped (an HTTP Range request). ``timeout``: seconds to
    connect, and between two reads. The size and, when expected, the SHA-256 are checked before
    the file moves into place; the hash is returned so the import need not read the file again.
    """
    part = dest.with_name(dest.name + ".part")
    last = ""
    # Plain bytes on the wire (a Range counts them); each attempt on a fresh connection (never one that
    # just broke); proxies from the environment, as urllib took them.
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
            headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}, auto_decompress=False,
            trust_env=True) as session:
        for _attempt in range(retries + 1):
            try:
                await _download_once(session, url, part, expected_size, progress)
                break
            except _Retry as exc:
                last = str(exc)
            except aiohttp.ClientError as exc:
                if not _transient(exc):
                    raise LamaError(ErrorCode.BAD_REQUEST, f"cannot download {url}: {exc}", url=url) from None
                last = f"{type(exc).__name__}: {exc}"
            except TimeoutError as exc:
                last = f"timed out: {exc}"
        else:
            raise LamaError(ErrorCode.INTERNAL, f"download of {url} failed after {retries + 1} attempts: {last}",
                            url=url, resume_from=part.stat().st_size if part.exists() else 0)
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        raise LamaError(ErrorCode.MODEL_INVALID, f"{dest.name}: {size} bytes, expected {expected_size}",
                        size=size, expected_size=expected_size)
    sha = None
    if expected_sha256 is not None:
        sha = await hash_file(part)
        if sha != expected_sha256.lower():
            part.unlink()  # a wrong file must not be resumed from next time
            raise LamaError(ErrorCode.MODEL_INVALID,
                            f"{dest.name}: SHA-256 {sha} does not match the catalogue's {expected_sha256}",
                            sha256=sha, expected_sha256=expected_sha256, url=url)
    os.replace(part, dest)
    return sha
