"""models.pull over the API (and `lamabus models pull`) from a local HTTP server serving the bundled GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from bus.config import Settings
from handlers.catalog import KNOWN_MODELS
from tests.test_api import error, raw
from tests.test_cli_registry import cli, conn
from tests.test_pull import FileServer
from wire.api import ModelActivate, ModelLoad, ModelPull, ModelsList, Progress
from wire.errors import ErrorCode

NAME = "SmolLM2-copy.Q4_1.gguf"
BUNDLED_SHA = KNOWN_MODELS[-1].sha256


@pytest.fixture
def settings(tmp_path: Path, nats_url: str) -> Settings:
    # No bundled model: the pulled copy is the only model, so it is imported, not matched to the bundled one.
    return Settings(nats_url=nats_url, data_dir=str(tmp_path / "data"), bundled_model=False)


@pytest.fixture
def server(model_path: Path):
    srv = FileServer()
    srv.files[NAME] = model_path.read_bytes()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    srv.thread.join(5)


@pytest.mark.model
async def test_pull_a_url_with_progress_then_load_it(service, client, server: FileServer, model_path: Path):
    assert (await client.call(ModelsList())).models == []
    size = model_path.stat().st_size
    progress: list[Progress] = []
    subject = client.nc.new_inbox()

    async def on_progress(msg) -> None:
        progress.append(msgspec.json.decode(msg.data, type=Progress))

    sub = await client.nc.subscribe(subject, cb=on_progress)
    await client.nc.flush()
    pulled = (await client.call(ModelPull(ref=server.url(NAME), progress_subject=subject), timeout=300)).model
    await client.nc.flush()
    await sub.unsubscribe()
    assert (pulled.id, pulled.provider, pulled.checksum, pulled.size) == ("smollm2-copy-q4-1", "url", BUNDLED_SHA,
                                                                          size)
    dest = service.settings.models_dir / NAME
    assert pulled.model_path == str(dest.resolve()) and dest.stat().st_size == size
    assert not dest.with_name(NAME + ".part").exists()
    assert progress and {p.operation for p in progress} == {"pull"} and progress[0].ref == server.url(NAME)
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    assert (progress[-1].done, progress[-1].total) == (size, size)
    assert server.requests == [(f"/{NAME}", None)]

    await client.call(ModelActivate(model_id=pulled.id))
    loaded = await client.call(ModelLoad(model_id=pulled.id), timeout=120)
    assert loaded.loaded == [pulled.id]


async def test_pull_refusals(service, client, server: FileServer):
    missing = await error(client, ModelPull(ref=server.url("missing.gguf")), timeout=60)
    assert missing.code is ErrorCode.NOT_FOUND
    status, body = await raw(client, "models.pull", b'{"ref": "ftp://example.org/x.gguf"}')
    assert status == "400" and body["code"] == "bad_request"
    bundled = await error(client, ModelPull(ref="smollm2"))
    assert bundled.code is ErrorCode.BAD_REQUEST and "bundled" in bundled.message
    assert (await client.call(ModelsList())).models == []


async def test_cli_pull_shows_a_progress_bar_and_the_model(service, server: FileServer, capsys):
    rc, out, err = await cli(capsys, "models", "pull", server.url(NAME), *conn(service))
    assert rc == 0, err
    assert "pulling SmolLM2-copy.Q4_1.gguf" in err and "98.4/98.4 MB" in err  # the bar, on stderr
    assert "model smollm2-copy-q4-1" in out and BUNDLED_SHA in out
    # Pulled already: a second pull finds the file in place and hands back the same record.
    rc, out, err = await cli(capsys, "models", "pull", server.url(NAME), "--json", *conn(service))
    assert rc == 0 and json.loads(out)["model"]["checksum"] == BUNDLED_SHA and err == ""
    assert len(server.requests) == 1
