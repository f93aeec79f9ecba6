"""``lamabus serve --openai`` and ``lamabus gateway`` as the commands people run (issue 23): the README's ``curl``
examples run against a real serve, the standalone gateway fronts a service on another broker URL, and the API
keys never reach a log."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import signal
from pathlib import Path

import pytest

from tests.cli_process import LAMABUS, cli_env
from tests.test_api import BUNDLED

pytestmark = pytest.mark.model

README = Path(__file__).resolve().parent.parent / "README.md"
KEY = "sk-readme-4d1c9e77b2"
README_URL = "http://127.0.0.1:8000"


def readme_examples() -> list[str]:
    """The shell commands between the README's ``openai-examples`` markers, one per paragraph."""
    text = README.read_text()
    block = re.search(r"<!-- openai-examples[^>]*-->\n(.*?)<!-- /openai-examples -->", text, re.S)
    assert block, "the README lost its OpenAI examples"
    commands = [c for c in re.split(r"\n\s*\n", block.group(1)) if c.strip()]
    return ["\n".join(line.removeprefix("    ") for line in c.splitlines()) for c in commands]


async def _until(proc: asyncio.subprocess.Process, marker: str, lines: list[str], timeout: float = 120) -> None:
    assert proc.stderr is not None
    async with asyncio.timeout(timeout):
        while True:
            raw = await proc.stderr.readline()
            if not raw:
                raise AssertionError(f"exited before {marker!r}:\n" + "".join(lines))
            lines.append(raw.decode())
            if marker in lines[-1]:
                return


async def _stop(proc: asyncio.subprocess.Process, lines: list[str]) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    async with asyncio.timeout(60):
        rest = await proc.stderr.read()
        lines.extend(rest.decode().splitlines(keepends=True))
        return await proc.wait()


async def _sh(command: str, env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec("bash", "-c", command, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    assert proc.returncode == 0, (command, err.decode())
    return out.decode()


async def test_the_readme_s_curl_examples_against_serve(tmp_path):
    data = tmp_path / "data"
    env = cli_env(tmp_path, LAMABUS_OPENAI_KEYS=f"chat:{KEY}")
    serve = await asyncio.create_subprocess_exec(
        LAMABUS, "serve", "--data-dir", str(data), "--web", "off", "--openai", "127.0.0.1:0", env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    log: list[str] = []
    try:
        await _until(serve, "lamabus ready", log)
        url = (data / "openai.url").read_text().strip()
        assert url.startswith("http://127.0.0.1:") and any("OpenAI-compatible API on" in line for line in log)
        shell = cli_env(tmp_path, OPENAI_API_KEY=KEY)
        models, chat, completion = [await _sh(c.replace(README_URL, url), shell) for c in readme_examples()]

        assert BUNDLED in [m["id"] for m in json.loads(models)["data"]]
        events = [line.removeprefix("data: ") for line in chat.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 3
        chunks = [json.loads(e) for e in events[:-1]]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]).strip()
        reply = json.loads(completion)
        assert reply["object"] == "text_completion" and reply["choices"][0]["text"] and reply["usage"]["total_tokens"]

        # Without the key: 401, in OpenAI's shape.
        refused = await _sh(f"curl -s {shlex.quote(url)}/v1/models", shell)
        assert json.loads(refused)["error"]["code"] == "missing_api_key"
    finally:
        status = await _stop(serve, log)
    assert status == 0, "".join(log[-30:])
    assert not (data / "openai.url").exists()
    assert KEY not in "".join(log) and "Traceback" not in "".join(log)


async def test_the_standalone_gateway_without_keys_listens_on_loopback_only(service, tmp_path):
    """``lamabus gateway`` in front of a service it reaches only through the broker's URL."""
    data = tmp_path / "gateway"
    gateway = await asyncio.create_subprocess_exec(
        LAMABUS, "gateway", "--nats-url", service.url, "--data-dir", str(data), "--openai", "0.0.0.0:0",
        env=cli_env(tmp_path), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    log: list[str] = []
    try:
        await _until(gateway, "lamabus gateway ready", log)
        assert any("loopback only" in line for line in log), log
        url = (data / "openai.url").read_text().strip()
        assert url.startswith("http://127.0.0.1:")
        body = json.dumps({"model": BUNDLED, "prompt": "The sky is", "max_tokens": 4, "temperature": 0})
        reply = json.loads(await _sh(f"curl -s {url}/v1/completions -H 'Content-Type: application/json' "
                                     f"-d {shlex.quote(body)}", cli_env(tmp_path)))
        assert reply["choices"][0]["text"] and reply["model"] == BUNDLED
    finally:
        status = await _stop(gateway, log)
    assert status == 0, "".join(log[-30:])
    assert not (data / "openai.url").exists()
