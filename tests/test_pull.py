"""pull: HTTP download with resume, verification, import — against a local server on 127.0.0.1:0."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import handlers.catalog as catalog
import handlers.model_files as model_files
from handlers.catalog import CatalogEntry, pull
from handlers.registry import Registry
from tests.test_registry import Clock, write_gguf
from wire.errors import ErrorCode, LamaError
from wire.params import GenerationParams, ModelParams


class FileServer:
    """Serves ``files`` by name, honouring ``Range: bytes=N-``; can misbehave on purpose."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.drop_first = 0  # this many responses are cut off halfway
        self.ignore_range = False
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                with outer.lock:
                    outer.requests.append((self.path, rng))
                    drop = outer.drop_first > 0
                    if drop:
                        outer.drop_first -= 1
                data = outer.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not outer.ignore_range:
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if drop:
                    # Promise the whole body, deliver half, hang up: a dropped connection mid-file.
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # A short poll interval: shutdown() waits for it.
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture
def server():
    srv = FileServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    srv.thread.join(5)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
async def registry(tmp_path: Path, models_dir: Path):
    async with Registry.open(tmp_path / "r.sqlite3", [models_dir], clock=Clock()) as reg:
        yield reg


def gguf_bytes(tmp_path: Path, salt: int = 0, n_floats: int = 64 * 1024) -> bytes:
    # Big enough (256 KiB) that "half" is many chunks and a resume is visible.
    return write_gguf(tmp_path / "src" / f"m{salt}.gguf", salt=salt, n_floats=n_floats).read_bytes()


#: For the dropped connections: 4 MiB. When a connection breaks, aiohttp loses what it had read from
#: the socket but not yet handed over (a few hundred KiB at most); with half a 256 KiB file that can be
#: all of it, and the resume would start from zero.
DROPPED_FLOATS = 1 << 20


def entry_for(server: FileServer, name: str, **kw) -> CatalogEntry:
    return CatalogEntry(id="test-model", name="Test Model", filename=name, architecture="llama",
                        quantization="Q4_K_M", parameters_count=1, context_length=256, approx_size="tiny",
                        download_url=server.url(name), **kw)


async def test_pull_a_url(registry: Registry, server: FileServer, models_dir: Path, tmp_path: Path):
    data = gguf_bytes(tmp_path)
    server.files["Tiny-Model.Q4_K_M.gguf"] = data
    progress: list[tuple[int, int | None]] = []
    m = await pull(registry, server.url("Tiny-Model.Q4_K_M.gguf"), progress=lambda d, t: progress.append((d, t)))
    dest = models_dir / "Tiny-Model.Q4_K_M.gguf"
    assert dest.read_bytes() == data and not (models_dir / "Tiny-Model.Q4_K_M.gguf.part").exists()
    assert (m.id, m.provider, m.checksum) == ("tiny-model-q4-k-m", "url", hashlib.sha256(data).hexdigest())
    assert progress[-1] == (len(data), len(data))
    assert server.requests == [("/Tiny-Model.Q4_K_M.gguf", None)]


async def test_resume_after_a_dropped_connection(registry: Registry, server: FileServer, models_dir: Path,
                                                 tmp_path: Path):
    data = gguf_bytes(tmp_path, n_floats=DROPPED_FLOATS)
    server.files["m.gguf"] = data
    server.drop_first = 1
    m = await pull(registry, server.url("m.gguf"))
    assert (models_dir / "m.gguf").read_bytes() == data
    assert m.checksum == hashlib.sha256(data).hexdigest()
    (first, _), (second, rng) = server.requests
    assert first == second == "/m.gguf"
    # Resumed from what arrived (the first half, less what the client had not handed over), not from zero.
    assert rng is not None and rng.startswith("bytes=") and rng.endswith("-"), rng
    assert 0 < int(rng.removeprefix("bytes=").rstrip("-")) <= len(data) // 2, rng


async def test_resume_a_part_file_left_by_an_earlier_run(registry: Registry, server: FileServer, models_dir: Path,
                                                         tmp_path: Path):
    data = gguf_bytes(tmp_path)
    server.files["m.gguf"] = data
    models_dir.mkdir(parents=True)
    (models_dir / "m.gguf.part").write_bytes(data[:1000])
    await pull(registry, server.url("m.gguf"))
    assert server.requests == [("/m.gguf", "bytes=1000-")]
    assert (models_dir / "m.gguf").read_bytes() == data


async def test_a_server_without_ranges_restarts_from_zero(registry: Registry, server: FileServer, models_dir: Path,
                                                          tmp_path: Path):
    data = gguf_bytes(tmp_path)
    server.files["m.gguf"] = data
    server.ignore_range = True
    models_dir.mkdir(parents=True)
    (models_dir / "m.gguf.part").write_bytes(b"garbage that is not a prefix")
    await pull(registry, server.url("m.gguf"))
    assert (models_dir / "m.gguf").read_bytes() == data


async def test_sha_mismatch_is_model_invalid_and_leaves_nothing(registry: Registry, server: FileServer,
                                                                models_dir: Path, tmp_path: Path, monkeypatch):
    data = gguf_bytes(tmp_path)
    server.files["m.gguf"] = data
    monkeypatch.setattr(catalog, "KNOWN_MODELS", (entry_for(server, "m.gguf", sha256="ab" * 32),))
    with pytest.raises(LamaError) as exc:
        await pull(registry, "test-model")
    assert exc.value.code is ErrorCode.MODEL_INVALID
    assert exc.value.details["sha256"] == hashlib.sha256(data).hexdigest()
    assert list(models_dir.iterdir()) == []  # neither the file nor a .part to resume a wrong file from
    assert await registry.list_models() == []


async def test_catalogue_entry_with_known_hash_and_size(registry: Registry, server: FileServer, tmp_path: Path,
                                                        monkeypatch):
    data = gguf_bytes(tmp_path)
    server.files["m.gguf"] = data
    entry = entry_for(server, "m.gguf", sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                      generation=GenerationParams(temperature=0.5), load=ModelParams(context_size=1024),
                      aliases=("tm",))
    monkeypatch.setattr(catalog, "KNOWN_MODELS", (entry,))
    hashed: list[str] = []
    sha256_file = model_files.sha256_file

    def counting(path, *args, **kwargs):
        hashed.append(Path(path).name)
        return sha256_file(path, *args, **kwargs)

    monkeypatch.setattr(model_files, "sha256_file", counting)
    m = await pull(registry, "TM")
    assert (m.id, m.name, m.temperature, m.context_size, m.provider) == (
        "test-model", "Test Model", 0.5, 1024, "huggingface")
    assert hashed == ["m.gguf.part"]  # checked once, as downloaded; the import takes that hash
    assert m.checksum == hashlib.sha256(data).hexdigest()
    # A second pull finds the file in place: no request, no new event.
    requests, position = len(server.requests), await registry.store.last_position()
    assert await pull(registry, "test-model") == m
    assert len(server.requests) == requests and await registry.store.last_position() == position


async def test_size_mismatch_is_model_invalid(registry: Registry, server: FileServer, tmp_path: Path, monkeypatch):
    server.files["m.gguf"] = gguf_bytes(tmp_path)
    monkeypatch.setattr(catalog, "KNOWN_MODELS", (entry_for(server, "m.gguf", size=123),))
    with pytest.raises(LamaError) as exc:
        await pull(registry, "test-model")
    assert exc.value.code is ErrorCode.MODEL_INVALID and exc.value.details["expected_size"] == 123


async def test_a_connection_that_always_drops_gives_up(registry: Registry, server: FileServer, models_dir: Path,
                                                       tmp_path: Path):
    data = gguf_bytes(tmp_path, n_floats=DROPPED_FLOATS)
    server.files["m.gguf"] = data
    server.drop_first = 100
    with pytest.raises(LamaError) as exc:
        await pull(registry, server.url("m.gguf"), retries=2)
    assert exc.value.code is ErrorCode.INTERNAL
    assert len(server.requests) == 3
    # Each attempt kept what arrived, so a later pull resumes close to the end.
    assert 0 < exc.value.details["resume_from"] < len(data)
    assert (models_dir / "m.gguf.part").stat().st_size == exc.value.details["resume_from"]


async def test_refusals(registry: Registry, server: FileServer, tmp_path: Path):
    cases = [
        (lambda: pull(registry, server.url("missing.gguf")), ErrorCode.NOT_FOUND),
        (lambda: pull(registry, "ftp://example/x.gguf"), ErrorCode.BAD_REQUEST),
        (lambda: pull(registry, "no-such-catalogue-id"), ErrorCode.BAD_REQUEST),
        (lambda: pull(registry, server.url("x.bin")), ErrorCode.BAD_REQUEST),
        (lambda: pull(registry, "smollm2"), ErrorCode.BAD_REQUEST),  # bundled, not downloadable
        (lambda: pull(registry, server.url("m.gguf"), tmp_path / "elsewhere"), ErrorCode.BAD_REQUEST),
    ]
    for make, code in cases:
        with pytest.raises(LamaError) as exc:
            await make()
        assert exc.value.code is code, exc.value
    assert await registry.list_models() == []
