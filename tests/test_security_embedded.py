"""`lamabus serve` with no set-up is secure by itself (issue 20, section 3): the CLI finds the admin login
in the data dir, a chat login is refused admin endpoints with one line, the page's token is printed on
stdout only, and no secret reaches a log, a diagnostic or an error. ``--insecure`` keeps the open broker
and says so."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path

import pytest

from bus.auth.credentials import Credentials
from bus.client import LamabusClient
from bus.config import Settings
from bus.node.app import LamabusService
from tests.cli_process import LAMABUS, cli_env, run_cli
from tests.conftest import entered_in_own_task
from wire.api import TopicList

pytestmark = pytest.mark.model


async def test_serve_secure_by_default_and_no_secret_in_any_output(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = cli_env(tmp_path)
    serve = await asyncio.create_subprocess_exec(
        LAMABUS, "serve", "--data-dir", str(data), "--web", "127.0.0.1:0", "--log-level", "debug", env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert serve.stdout is not None and serve.stderr is not None
    logs: list[str] = []
    outputs: list[str] = []
    try:
        async with asyncio.timeout(120):
            while not any("lamabus ready" in line for line in logs):
                raw = await serve.stderr.readline()
                assert raw, "serve exited before it was ready:\n" + "".join(logs)
                logs.append(raw.decode())
            page_line = (await serve.stdout.readline()).decode()
        drain = asyncio.ensure_future(serve.stderr.read())
        secrets = json.loads((data / "auth" / "secrets.json").read_text())
        assert page_line.startswith("chat page: http://127.0.0.1:") and f"#token={secrets['chat']}" in page_line

        # The WebSocket listener (the page's) takes the chat login only: the server's config says so per user.
        config = (data / "jetstream.conf").read_text()
        users = json.loads(config[config.index("users = ") + len("users = "):config.rindex("]") + 1])
        assert {u["user"]: u["allowed_connection_types"] for u in users} == {
            "lamabus-service": ["STANDARD"], "lamabus-admin": ["STANDARD"], "chat": ["STANDARD", "WEBSOCKET"]}

        # The admin CLI with no set-up: it finds the admin password in the data directory.
        code, out, err = await run_cli("chat", "demo", "--once", "Hello", "--max-tokens", "8", "--data-dir", str(data),
                                    env=env, timeout=120)
        assert code == 0 and out.strip(), err
        outputs += [out, err]
        code, out, err = await run_cli("diagnostics", "--json", "--data-dir", str(data), env=env, timeout=120)
        assert code == 0, err
        outputs += [out, err]
        assert json.loads(out)["service"]["embedded"] is True

        # A chat login may not remove a model: one line, exit 1, `forbidden`, no timeout.
        chat_password = tmp_path / "chat-password"
        chat_password.write_text(secrets["chat"])
        url = (data / "nats.url").read_text().strip()
        loop = asyncio.get_running_loop()
        started = loop.time()
        code, out, err = await run_cli("models", "rm", "smollm2-135m-instruct", "--nats-url", url, "--nats-user", "chat",
                                    "--nats-password-file", str(chat_password), env=env, timeout=120)
        outputs += [out, err]
        assert code == 1 and err.strip() == "error [forbidden]: forbidden: this login may not publish to " \
                                            "lama.api.models.remove", err
        assert loop.time() - started < 20
        # A wrong password for the admin: unauthorized, one line.
        wrong = tmp_path / "wrong"
        wrong.write_text("wrong-password")
        code, out, err = await run_cli("topics", "list", "--nats-url", url, "--nats-user", "lamabus-admin",
                                    "--nats-password-file", str(wrong), env=env, timeout=120)
        outputs += [out, err]
        assert code == 1 and err.startswith("error [unauthorized]") and len(err.strip().splitlines()) == 1, err
    finally:
        if serve.returncode is None:
            serve.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            await serve.wait()
    logs.append((await drain).decode())
    rest = (await serve.stdout.read()).decode()
    assert serve.returncode == 0
    everything = "".join(logs) + rest + "".join(outputs)
    for role in ("service", "admin"):
        assert secrets[role] not in everything + page_line, f"the {role} password leaked"
    assert secrets["chat"] not in everything, "the page token is for stdout's one line only"
    assert "users service, admin and chat" in "".join(logs)


async def test_insecure_keeps_the_open_broker_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"), embedded_port=0, web="off", analysis=False, insecure=True)
    with caplog.at_level(logging.WARNING, logger="lamabus"):
        async with entered_in_own_task(LamabusService(settings)) as svc:
            assert svc.auth is None and svc.url
            async with LamabusClient.connect(svc.url, credentials=Credentials()) as client:
                assert (await client.call(TopicList())).topics == []
    assert any("--insecure" in r.getMessage() and "anyone" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "data" / "auth").exists()
    # The environment says the same as the flag.
    from bus.config import load_settings

    assert load_settings(environ={"LAMABUS_INSECURE": "1"}).insecure is True
    assert load_settings(environ={}).insecure is False
