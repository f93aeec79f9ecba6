"""The README's "Done when": `lamabus serve` with no configuration, then `lamabus chat --once`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

LAMABUS = str(Path(sys.executable).parent / "lamabus")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMABUS_")}
    env["HOME"] = str(tmp_path / "home")  # no stray config or data from the developer's home
    return env


async def _wait_ready(proc: asyncio.subprocess.Process, timeout: float = 120) -> list[str]:
    assert proc.stderr is not None
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            raw = await proc.stderr.readline()
            if not raw:
                raise AssertionError("serve exited before it was ready:\n" + "".join(lines))
            lines.append(raw.decode())
            if "lamabus ready" in lines[-1]:
                return lines


async def test_serve_with_embedded_broker_then_chat_once(tmp_path):
    data = tmp_path / "data"
    env = _env(tmp_path)
    serve = await asyncio.create_subprocess_exec(
        LAMABUS, "serve", "--data-dir", str(data), env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        log = await _wait_ready(serve)
        assert any("embedded nats-server with JetStream" in line for line in log)
        url = (data / "nats.url").read_text().strip()
        assert url.startswith("nats://127.0.0.1:")
        assert (data / "registry.sqlite3").exists() and (data / "jetstream").is_dir()

        chat = await asyncio.create_subprocess_exec(
            LAMABUS, "chat", "demo", "--once", "Hello", "--max-tokens", "16", "--temperature", "0",
            "--data-dir", str(data), env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(120):
            out, err = await chat.communicate()
        assert chat.returncode == 0, err.decode()
        assert out.decode().strip(), "no reply text streamed"
        assert "tokens" in err.decode() and "tok/s" in err.decode()
    finally:
        if serve.returncode is None:
            serve.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            await serve.wait()
    assert serve.returncode == 0
    assert not (data / "nats.url").exists(), "the URL file of a stopped broker must not linger"


async def test_chat_reports_a_structured_error_when_no_broker_answers(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        LAMABUS, "chat", "demo", "--once", "hi", "--nats-url", "nats://127.0.0.1:1", env=_env(tmp_path),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    assert proc.returncode != 0
    assert "Traceback" not in err.decode()
    assert "error" in err.decode().lower()


async def test_interactive_chat_posts_each_line_and_streams_replies(service, tmp_path):
    chat = await asyncio.create_subprocess_exec(
        LAMABUS, "chat", "talk", "--max-tokens", "12", "--temperature", "0", "--nats-url", service.url,
        env=_env(tmp_path), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(180):
        out, err = await chat.communicate(b"Hello!\nWhat is two plus two?\n")
    assert chat.returncode == 0, err.decode()
    assert err.decode().count("tok/s") == 2, err.decode()  # one completion line per message
    history = await service.registry.history("talk")
    assert [t.is_ai for t in history] == [False, True, False, True]
    assert [t.text for t in history if not t.is_ai] == ["Hello!", "What is two plus two?"]
    for reply in (t.text for t in history if t.is_ai):
        assert reply in out.decode()


async def test_embedded_broker_does_not_outlive_a_killed_serve(tmp_path):
    data = tmp_path / "data"
    serve = await asyncio.create_subprocess_exec(
        LAMABUS, "serve", "--data-dir", str(data), env=_env(tmp_path),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await _wait_ready(serve)
        host, port = (data / "nats.url").read_text().strip().removeprefix("nats://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))  # the broker is up
        writer.close()
        await writer.wait_closed()
        serve.kill()
        await serve.wait()
        async with asyncio.timeout(30):
            while True:  # the broker's end: the port stops accepting (no event to wait on from here)
                try:
                    _, writer = await asyncio.open_connection(host, int(port))
                except OSError:
                    break
                writer.close()
                await writer.wait_closed()
                await asyncio.sleep(0.1)
    finally:
        if serve.returncode is None:
            serve.kill()
            await serve.wait()
