"""Several lamabus nodes (``--registry nats``) on a 3-server NATS cluster with users, the roles' permissions
and TLS for clients (issue 20, section 5): the nodes log in as ``service`` over ``tls://`` with a password
from a file, a ``chat`` client gets its answer, an ``admin`` client lists the models, and the chat client
is refused the admin endpoints. A permission the service role lacks would show here as a node that never
takes its partitions or never answers."""

from __future__ import annotations

import contextlib
import json
import ssl
from pathlib import Path
from typing import Any

import pytest

from bench.nats_cluster import NatsCluster
from bus.auth.credentials import Credentials
from bus.auth.embedded import CONNECTION_TYPES, USERS
from bus.auth.roles import ROLES, permissions
from bus.client import LamabusClient
from bus.config import Settings
from tests.conftest import entered_in_own_task
from bench.security_rig import make_pki, tls_config
from wire.api import ModelRemove, ModelsList
from wire.errors import ErrorCode, LamaError
from wire.params import GenerationParams

pytestmark = [pytest.mark.slow, pytest.mark.model]

PASSWORDS = {role: f"{role}-cluster-password-0123456789" for role in ROLES}
ROOT_PASSWORD = "root-cluster-password-0123456789"  # the harness's probe: every permission (a broker operator)


def _config(pki: Any) -> str:
    users: list[dict[str, Any]] = [{"user": "root", "password": ROOT_PASSWORD}]
    for role in ROLES:
        users.append({"user": USERS[role], "password": PASSWORDS[role],
                      "permissions": permissions(role).server_config(),
                      "allowed_connection_types": list(CONNECTION_TYPES[role])})
    return "authorization {\n  users = " + json.dumps(users) + "\n}\n" + tls_config(pki, verify=False)


@pytest.mark.timeout(600)
async def test_nodes_and_clients_log_in_with_roles_over_tls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pki = make_pki(tmp_path / "pki")
    probe_tls = ssl.create_default_context(cafile=str(pki.ca))
    cluster = NatsCluster(tmp_path / "cluster", size=3, config=_config(pki), scheme="tls",
                          connect_options={"user": "root", "password": ROOT_PASSWORD, "tls": probe_tls})
    async with cluster:
        password_file = tmp_path / "service-password"
        password_file.write_text(PASSWORDS["service"])

        def settings(server: int, node_id: str) -> Settings:
            return Settings(nats_url=",".join(cluster.urls_from(server)), data_dir=str(tmp_path / node_id),
                            registry="nats", node_id=node_id, ack_wait=3.0, web="off", metrics="off", analysis=False,
                            nats_user=USERS["service"], nats_password_file=str(password_file),
                            nats_tls_ca=str(pki.ca))

        from bus.node.app import LamabusService

        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(entered_in_own_task(LamabusService(settings(1, "a"))))
            b = await stack.enter_async_context(entered_in_own_task(LamabusService(settings(2, "b"))))
            assert a.url and a.url.startswith("tls://") and b.registry is not None

            def login(role: str) -> Credentials:
                return Credentials(user=USERS[role], password=PASSWORDS[role], tls_ca=str(pki.ca))

            urls = ",".join(cluster.urls_from(3))
            async with LamabusClient.connect(urls, credentials=login("admin")) as admin:
                models = await admin.call(ModelsList())
                assert models.active_model_id, models
            async with LamabusClient.connect(urls, credentials=login("chat")) as chat:
                for topic in ("left", "right", "middle"):  # spread over the partitions of both nodes
                    items = [item async for item in chat.ask(
                        topic, "Say hi.", params=GenerationParams(max_tokens=4, temperature=0.0), timeout=240)]
                    assert type(items[-1]).__name__ == "GenerationCompleted", items[-1]
                with pytest.raises(LamaError) as caught:
                    await chat.call(ModelRemove(model_id=models.active_model_id or "x"))
                assert caught.value.code is ErrorCode.FORBIDDEN
    # The nodes never met a refusal of their own: the service role has all a node needs, on a cluster too.
    refused = [r.getMessage() for r in caplog.records if r.name.startswith("lamabus") and "forbidden" in r.getMessage()]
    assert refused == [], refused
