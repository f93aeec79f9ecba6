"""Logging in to a secured broker (issue 20, sections 1 and 3) on real nats-servers: each kind of login
(user + password, token, nkey, a .creds file with JWTs made here, TLS with certificates made here), the
one-line errors of a refused login, a credential revoked while running, and the embedded broker's
generated secrets (private, kept, never printed)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bus.auth.credentials import Credentials, from_settings
from bus.auth.embedded import load, load_or_create
from bus.broker.connection import connect
from bus.broker.embedded import EmbeddedNatsServer
from bus.config import Settings
from bench.security_rig import make_operator, make_pki, new_nkey, tls_config
from tests.cli_process import cli_env, run_cli
from wire.errors import ErrorCode, LamaError

PASSWORD = "correct-horse-battery-staple-0123"
TOKEN = "s3cret-token-for-the-broker-456789"


def _users(*users: dict[str, Any]) -> str:
    return "authorization {\n  users = " + json.dumps(list(users)) + "\n}\n"


async def _round_trip(nc: Any) -> None:
    """A publish that comes back: the login works for real traffic, not only for CONNECT."""
    got = asyncio.get_running_loop().create_future()

    async def on_msg(msg: Any) -> None:
        if not got.done():
            got.set_result(msg.data)

    await nc.subscribe("check.login", cb=on_msg)
    await nc.publish("check.login", b"ok")
    assert await asyncio.wait_for(got, 5) == b"ok"


async def _refused(url: str, credentials: Credentials) -> LamaError:
    with pytest.raises(LamaError) as caught:
        nc = await asyncio.wait_for(connect(url, credentials=credentials, reconnect_forever=True), 30)
        await nc.close()
    assert caught.value.code is ErrorCode.UNAUTHORIZED, caught.value
    return caught.value


async def test_user_and_password_from_a_file_or_the_environment(tmp_path: Path) -> None:
    async with EmbeddedNatsServer(tmp_path / "js", config=_users({"user": "alice", "password": PASSWORD})) as server:
        assert server.url
        password_file = tmp_path / "password"
        password_file.write_text(PASSWORD + "\n")
        from_file = from_settings(Settings(nats_user="alice", nats_password_file=str(password_file)), environ={})
        from_env = from_settings(Settings(nats_user="alice"), environ={"LAMABUS_NATS_PASSWORD": PASSWORD})
        for credentials in (from_file, from_env):
            assert PASSWORD not in repr(credentials) and PASSWORD not in credentials.describe()
            nc = await connect(server.url, credentials=credentials)
            await _round_trip(nc)
            await nc.close()
        # A wrong password, even one that would reconnect forever, stops at once with one clear line.
        error = await _refused(server.url, Credentials(user="alice", password="not-" + PASSWORD))
        assert "Authorization Violation" in error.message and "user 'alice'" in error.message
        assert PASSWORD not in error.message and "not-" + PASSWORD not in error.message
        # A password without a user is a setting error, named.
        with pytest.raises(LamaError) as caught:
            from_settings(Settings(), environ={"LAMABUS_NATS_PASSWORD": PASSWORD})
        assert caught.value.code is ErrorCode.BAD_REQUEST and "nats_user" in caught.value.message


async def test_token(tmp_path: Path) -> None:
    config = "authorization { token: " + json.dumps(TOKEN) + " }\n"
    async with EmbeddedNatsServer(tmp_path / "js", config=config) as server:
        assert server.url
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        nc = await connect(server.url, credentials=from_settings(Settings(nats_token_file=str(token_file)), environ={}))
        await _round_trip(nc)
        await nc.close()
        error = await _refused(server.url, from_settings(Settings(), environ={"LAMABUS_NATS_TOKEN": "wrong-token"}))
        assert "a token" in error.message and "wrong-token" not in error.message


async def test_nkey_seed_file(tmp_path: Path) -> None:
    user, stranger = new_nkey("user"), new_nkey("user")
    async with EmbeddedNatsServer(tmp_path / "js", config=_users({"nkey": user.public})) as server:
        assert server.url
        seed = tmp_path / "user.nk"
        seed.write_bytes(user.seed)
        nc = await connect(server.url, credentials=from_settings(Settings(nats_nkey=str(seed)), environ={}))
        await _round_trip(nc)
        await nc.close()
        other = tmp_path / "stranger.nk"
        other.write_bytes(stranger.seed)
        error = await _refused(server.url, Credentials(nkey_seed_file=str(other)))
        assert str(other) in error.message and stranger.seed.decode() not in error.message


async def test_creds_file_and_an_expired_one(tmp_path: Path) -> None:
    operator = make_operator(tmp_path / "op")
    async with EmbeddedNatsServer(tmp_path / "js", config=operator.config) as server:
        assert server.url
        good = operator.user_creds(tmp_path / "good.creds")
        nc = await connect(server.url, credentials=from_settings(Settings(nats_creds=str(good)), environ={}))
        await _round_trip(nc)
        await nc.close()
        expired = operator.user_creds(tmp_path / "expired.creds", expires=int(time.time()) - 60)
        error = await _refused(server.url, Credentials(creds_file=str(expired)))
        assert "expired.creds" in error.message and "nats_creds" in error.message


async def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    async with EmbeddedNatsServer(tmp_path / "js", config=tls_config(pki)) as server:
        assert server.url
        port = server.port
        settings = Settings(nats_tls_ca=str(pki.ca), nats_tls_cert=str(pki.client_cert),
                            nats_tls_key=str(pki.client_key))
        for url in (f"tls://127.0.0.1:{port}", f"nats://127.0.0.1:{port}"):
            nc = await connect(url, credentials=from_settings(settings, environ={}))
            await _round_trip(nc)
            await nc.close()
        # The broker's certificate signed by a CA we do not trust: refused, and the message says what to set.
        error = await _refused(f"tls://127.0.0.1:{port}", Credentials(
            tls_ca=str(pki.other_ca), tls_cert=str(pki.client_cert), tls_key=str(pki.client_key)))
        assert "not trusted" in error.message and "nats_tls_ca" in error.message
        # No client certificate where the broker wants one.
        error = await _refused(f"tls://127.0.0.1:{port}", Credentials(tls_ca=str(pki.ca)))
        assert "TLS" in error.message or "refused" in error.message


async def test_certificates_without_key_identifiers_on_each_python(tmp_path: Path) -> None:
    """Certificates as older tooling made them: 3.11 and 3.12 accept the chain; 3.13 verifies strictly and
    refuses it, and the message says that (not "set nats_tls_ca", which is already right)."""
    pki = make_pki(tmp_path / "pki", rfc5280=False)
    async with EmbeddedNatsServer(tmp_path / "js", config=tls_config(pki, verify=False)) as server:
        url = f"tls://127.0.0.1:{server.port}"
        if sys.version_info < (3, 13):
            nc = await connect(url, credentials=Credentials(tls_ca=str(pki.ca)))
            await _round_trip(nc)
            await nc.close()
        else:
            error = await _refused(url, Credentials(tls_ca=str(pki.ca)))
            assert error.code == ErrorCode.UNAUTHORIZED
            assert "strict RFC 5280" in error.message and "key identifier" in error.message.lower()
            assert "set nats_tls_ca" not in error.message


async def test_cli_and_serve_stop_with_one_line_on_a_refused_login(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    config = _users({"user": "alice", "password": PASSWORD}) + tls_config(pki, verify=False)
    async with EmbeddedNatsServer(tmp_path / "js", config=config) as server:
        url = f"tls://127.0.0.1:{server.port}"
        wrong = tmp_path / "wrong-password"
        wrong.write_text("not-" + PASSWORD)
        env = cli_env(tmp_path)
        login = ["--nats-url", url, "--nats-user", "alice", "--nats-password-file", str(wrong),
                 "--nats-tls-ca", str(pki.ca), "--data-dir", str(tmp_path / "data")]
        for command in (["models", "list"], ["chat", "demo", "--once", "hi"], ["replay", "demo"],
                        ["serve", "--web", "off", "--metrics", "off"]):
            code, out, err = await run_cli(*command, *login, env=env, timeout=60)
            lines = err.strip().splitlines()
            assert code == 1, (command, code, err)
            assert lines[-1].startswith("error [unauthorized]: cannot log in to NATS at tls://127.0.0.1:"), lines
            assert "Traceback" not in err and PASSWORD not in err + out, err
            assert len([line for line in lines if line.startswith("error")]) == 1
        # An untrusted certificate: the same one line, naming the setting.
        code, _, err = await run_cli("models", "list", "--nats-url", url, "--nats-tls-ca", str(pki.other_ca),
                                     env=env, timeout=60)
        assert code == 1 and "not trusted" in err and "nats_tls_ca" in err and "Traceback" not in err


class _Heard(logging.Handler):
    """Sets an event when a log record contains a given text (the test waits on it, bounded)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []
        self.waiting: list[tuple[str, asyncio.Event]] = []
        self.loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        self.records.append(text)
        for wanted, event in self.waiting:
            if wanted in text:
                self.loop.call_soon_threadsafe(event.set)

    async def wait_for(self, wanted: str, timeout: float = 30) -> None:
        event = asyncio.Event()
        self.waiting.append((wanted, event))
        if any(wanted in r for r in self.records):
            event.set()
        await asyncio.wait_for(event.wait(), timeout)


async def test_a_credential_revoked_while_running_is_logged_and_retried(tmp_path: Path) -> None:
    """The broker drops the user (config reload): a service connection logs it once, keeps retrying, and
    is back when the user is restored, as for a lost broker."""
    alice = {"user": "alice", "password": PASSWORD}
    keeper = {"user": "keeper", "password": "keeper-" + PASSWORD}
    server = EmbeddedNatsServer(tmp_path / "js", config=_users(alice, keeper))
    heard = _Heard()
    logger = logging.getLogger("lamabus.bus")
    logger.addHandler(heard)
    level = logger.level
    logger.setLevel(logging.INFO)  # "reconnected to" is said at INFO
    async with server:
        assert server.url and server.pid
        nc = await connect(server.url, credentials=Credentials(user="alice", password=PASSWORD))
        try:
            await _round_trip(nc)
            server.config = _users(keeper)
            server._write_config()  # what a reload reads
            os.kill(server.pid, signal.SIGHUP)
            await heard.wait_for("the broker refused the login")
            assert not nc.is_closed  # still trying
            server.config = _users(alice, keeper)
            server._write_config()
            os.kill(server.pid, signal.SIGHUP)
            await heard.wait_for("reconnected to")
            await _round_trip(nc)
            refusals = [r for r in heard.records if "the broker refused the login" in r]
            assert len(refusals) == 1, refusals  # said once, not on every retry
            assert all(PASSWORD not in r for r in heard.records)
        finally:
            logger.removeHandler(heard)
            logger.setLevel(level)
            await nc.close()


def test_embedded_secrets_are_private_and_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = load_or_create(data)
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.path.parent.stat().st_mode) == 0o700
    again = load_or_create(data)
    assert again.passwords == first.passwords and load(data) == again  # kept across restarts
    assert len(set(first.passwords.values())) == 3
    for secret in first.passwords.values():
        assert secret not in repr(first) and secret not in repr(first.credentials("admin"))
    os.chmod(first.path, 0o644)  # loosened by someone: tightened again on the next start
    load_or_create(data)
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600


async def test_the_embedded_config_file_is_private(tmp_path: Path) -> None:
    auth = load_or_create(tmp_path / "data")
    async with EmbeddedNatsServer(tmp_path / "data" / "jetstream", config=auth.server_config("lama")) as server:
        assert stat.S_IMODE(server.config_path.stat().st_mode) == 0o600
        assert auth.passwords["admin"] in server.config_path.read_text()


def test_urls_and_credentials_never_show_a_secret() -> None:
    from bus.broker.connection import redact_url

    assert redact_url(f"nats://alice:{PASSWORD}@127.0.0.1:4222,tls://bob:x@h:1") == \
        "nats://***@127.0.0.1:4222,tls://***@h:1"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    credentials = Credentials(user="alice", password=PASSWORD, token=TOKEN)
    for shown in (repr(credentials), str(credentials), credentials.describe(), f"{credentials!r}"):
        assert PASSWORD not in shown and TOKEN not in shown
    assert sorted(credentials.secrets()) == sorted([PASSWORD, TOKEN])


@pytest.mark.model
async def test_a_password_in_the_broker_url_stays_out_of_diagnostics_and_logs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bus.node.app import LamabusService
    from tests.conftest import entered_in_own_task

    async with EmbeddedNatsServer(tmp_path / "js", config=_users({"user": "alice", "password": PASSWORD})) as server:
        url = f"nats://alice:{PASSWORD}@127.0.0.1:{server.port}"
        settings = Settings(nats_url=url, data_dir=str(tmp_path / "data"), web="off", analysis=False)
        with caplog.at_level(logging.DEBUG):
            async with entered_in_own_task(LamabusService(settings)) as svc:
                diagnostics = await svc.diagnostics()
                assert diagnostics.url == f"nats://***@127.0.0.1:{server.port}"
        assert all(PASSWORD not in r.getMessage() for r in caplog.records)


def test_the_cli_logs_in_as_the_local_admin_only_for_the_local_embedded_broker(tmp_path: Path) -> None:
    from bus.auth.embedded import client_login

    data = tmp_path / "data"
    auth = load_or_create(data)
    (data / "nats.url").write_text("nats://127.0.0.1:4999\n")
    for flags in ({}, {"nats_url": "nats://127.0.0.1:4999"}):
        url, credentials = client_login(Settings(data_dir=str(data), **flags))
        assert url == "nats://127.0.0.1:4999" and credentials.user == "lamabus-admin"
        assert credentials.password == auth.passwords["admin"]
    # Another broker: the settings' login (here none), never the local admin's password.
    url, credentials = client_login(Settings(data_dir=str(data), nats_url="nats://elsewhere:4222"))
    assert url == "nats://elsewhere:4222" and credentials.empty
    # Settings that name a login win over the data directory's.
    url, credentials = client_login(Settings(data_dir=str(data), nats_user="bob"))
    assert credentials.user == "bob"
