"""The chat page's parts that need no browser: the committed bundle matches its sources, the web
settings, and the embedded broker's WebSocket listener (the page's way in). The page itself, in a
real headless browser, is tests/test_web_page.py."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from bus.web.page import static_dir

ROOT = Path(__file__).resolve().parent.parent


def _source_digest() -> str:
    """web/build.mjs's sourceDigest: SHA-256 over the build's inputs."""
    web = ROOT / "web"
    files = ["build.mjs", "package.json", "package-lock.json",
             *(f"src/{p.name}" for p in sorted((web / "src").iterdir(), key=lambda p: p.name))]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f}\n".encode())
        h.update((web / f).read_bytes())
        h.update(b"\n")
    return h.hexdigest()


def test_committed_bundle_is_built_from_the_committed_sources():
    built = json.loads((static_dir() / "build.json").read_text())
    assert built["sources"] == _source_digest(), "bus/web/static is stale: run web/build.sh and commit bus/web/static"
    assert built["versions"]["@nats-io/nats-core"].startswith("3.")
    assert built["versions"]["@nats-io/jetstream"].startswith("3.")
    for name in ("index.html", "app.js", "style.css"):
        assert (static_dir() / name).is_file()
    # Model output reaches the DOM as text only: nothing in the page parses HTML.
    for name in ("main.js", "markdown.js"):
        source = (ROOT / "web" / "src" / name).read_text()
        assert not re.search(r"\.(inner|outer)HTML\s*[+]?=|insertAdjacentHTML|document\.write|DOMParser|"
                             r"createContextualFragment|srcdoc", source), name


def test_web_settings_defaults_environment_and_flags():
    from bus.cli.main import _settings, build_parser
    from bus.config import load_settings
    from wire.errors import LamaError

    s = load_settings({}, environ={})
    assert (s.web, s.web_address, s.nats_ws_url, s.embedded_ws_port) == ("127.0.0.1:8080", ("127.0.0.1", 8080),
                                                                         None, 4223)
    s = load_settings({}, environ={"LAMABUS_WEB": "off", "LAMABUS_NATS_WS_URL": "ws://broker:4223"})
    assert s.web_address is None and s.nats_ws_url == "ws://broker:4223"
    assert load_settings({"web": "[::1]:0"}, environ={}).web_address == ("::1", 0)
    for bad in ({"web": "8080"}, {"web": "127.0.0.1:port"}, {"nats_ws_url": "nats://x:4222"}):
        with pytest.raises(LamaError):
            load_settings(bad, environ={})
    args = build_parser().parse_args(["serve", "--web", "127.0.0.1:0", "--nats-ws-url", "wss://example:443"])
    s = _settings(args)
    assert (s.web_address, s.nats_ws_url) == (("127.0.0.1", 0), "wss://example:443")


async def test_embedded_broker_websocket_listener_comes_back_on_its_ports(tmp_path):
    import aiohttp

    from bus.broker.embedded import EmbeddedNatsServer

    async def handshake(url: str) -> bytes:
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            return (await ws.receive(timeout=10)).data

    server = EmbeddedNatsServer(tmp_path / "jetstream", websocket_port=0)
    async with server:
        assert server.ws_url and server.ws_url.startswith("ws://127.0.0.1:")
        assert "no_tls: true" in server.config_path.read_text()
        assert (await handshake(server.ws_url)).startswith(b"INFO ")
        urls = server.url, server.ws_url
        await server.stop()
        await server.start()
        assert (server.url, server.ws_url) == urls
        assert (await handshake(server.ws_url)).startswith(b"INFO ")
    # Without a WebSocket port, no config file and no listener (the old command line).
    async with EmbeddedNatsServer(tmp_path / "plain") as plain:
        assert plain.ws_url is None and not plain.config_path.exists()
