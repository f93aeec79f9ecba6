"""The three roles on a real lamabus service with its secure embedded broker (issue 20, section 2):
every endpoint of the table per role (allowed vs forbidden, as the broker decides), forged topic events
refused, the chat role reading history without touching streams or the service's consumer, a chat user
limited to its own topics, and docs/security.md's roles section matching the generated one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from bus.auth.embedded import USERS
from bus.auth.roles import ROLES, grant, permissions, roles_markdown
from bus.broker.connection import connect, guarded
from bus.broker.embedded import EmbeddedNatsServer
from bus.client import LamabusClient
from bus.config import Settings
from bus.node.app import LamabusService
from bus.replay.reader import records
from tests.conftest import entered_in_own_task
from wire.api import ENDPOINTS, TopicList
from wire.errors import ErrorCode, LamaError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[LamabusService]:
    """lamabus with its embedded broker as `serve` starts it: users and permissions, no --insecure."""
    settings = Settings(data_dir=str(tmp_path / "data"), embedded_port=0, web="off", analysis=False,
                        metrics="bus")
    async with entered_in_own_task(LamabusService(settings)) as svc:
        assert svc.auth is not None and svc.embedded is not None
        yield svc


async def _as(svc: LamabusService, role: str) -> Any:
    assert svc.auth is not None and svc.url
    return LamabusClient.connect(svc.url, credentials=svc.auth.credentials(role))  # type: ignore[arg-type]


async def _outcome(client: LamabusClient, subject: str) -> str:
    """``forbidden`` when the broker refuses the request, else ``answered`` (a reply or a coded error; also a
    slow one: on a loaded machine ``llm.initialize`` may load the model past the wait, and it still got in)."""
    import nats.errors

    try:
        await client.request(subject, b"{}", timeout=20)
    except LamaError as exc:
        return "forbidden" if exc.code is ErrorCode.FORBIDDEN else "answered"
    except nats.errors.TimeoutError:
        return "answered"
    return "answered"


@pytest.mark.model
async def test_every_endpoint_of_the_table_per_role(secured: LamabusService) -> None:
    """Walks wire/api.py's table: a role's allowed endpoints answer (a reply or a coded error about the
    empty request), every other one is `forbidden` at once, for the shared and the node-scoped subjects."""
    node = secured.settings.node_name
    for role in ROLES:
        allowed = grant(role)  # type: ignore[arg-type]
        async with await _as(secured, role) as client:
            for spec in ENDPOINTS:
                loop = asyncio.get_running_loop()
                started = loop.time()
                got = await _outcome(client, f"lama.api.{spec.name}")
                want = "answered" if allowed.may_call(spec.name) else "forbidden"
                assert got == want, (role, spec.name, got)
                if want == "forbidden":
                    assert loop.time() - started < 10, (role, spec.name, "a refusal must not wait for a timeout")
            # One node's own copy of the API is admin's (and the service's): chat never reaches it.
            got = await _outcome(client, f"lama.api.node.{node}.diagnostics")
            assert got == ("forbidden" if role == "chat" else "answered"), (role, got)
            # The typed client says the same for a call the role may make.
            assert (await client.call(TopicList())).topics == []


@pytest.mark.model
async def test_chat_and_admin_cannot_forge_replies_but_the_service_can(secured: LamabusService) -> None:
    """Publishing on a topic's .evt/.tok is the service's alone; a forged event never reaches a listener."""
    async with await _as(secured, "admin") as watcher:
        seen: list[str] = []
        arrived = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            seen.append(msg.subject)
            arrived.set()

        for kind in ("evt", "tok"):
            await watcher.nc.subscribe(f"lama.topic.demo.{kind}", cb=on_msg)
        await watcher.nc.flush()
        forged = json.dumps({"type": "generation.completed", "requestId": "x"}).encode()
        for role in ("chat", "admin"):
            async with await _as(secured, role) as client:
                for kind in ("evt", "tok"):
                    subject = f"lama.topic.demo.{kind}"
                    with client.nc.denials.watching(subject) as refused:
                        await client.nc.publish(subject, forged)
                        await client.nc.flush()
                        error = await asyncio.wait_for(refused, 5)
                    assert error.code is ErrorCode.FORBIDDEN and error.details["subject"] == subject
        # Positive control: the same publish by the service does arrive, so the watcher would have seen a forgery.
        assert secured.nc is not None
        await secured.nc.publish("lama.topic.demo.tok", b"{}")
        await secured.nc.flush()
        await asyncio.wait_for(arrived.wait(), 5)
        assert seen == ["lama.topic.demo.tok"]


@pytest.mark.model
async def test_chat_posts_and_reads_history_but_cannot_touch_streams_or_the_service_consumer(
        secured: LamabusService) -> None:
    async with await _as(secured, "chat") as client:
        items = [item async for item in client.ask("history", "Hi", params=None, timeout=120)]
        assert items and type(items[-1]).__name__ == "GenerationCompleted"
        read = [r async for r in records(client.js, "history", prefix="lama")]
        assert {type(r.event).__name__ for r in read} >= {"ChatMessage", "GenerationCompleted"}
        stream = "LAMA_TOPICS"
        refused = {  # subject -> the call that uses it (made when tried)
            f"$JS.API.STREAM.DELETE.{stream}": lambda: client.js.delete_stream(stream),
            f"$JS.API.STREAM.PURGE.{stream}": lambda: client.js.purge_stream(stream),
            f"$JS.API.CONSUMER.DELETE.{stream}.lamabus-assistant": lambda: client.js.delete_consumer(
                stream, "lamabus-assistant"),
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.lamabus-assistant": lambda: client.nc.request(
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.lamabus-assistant", b'{"batch":1}', timeout=10),
            f"$JS.API.CONSUMER.CREATE.{stream}.lamabus-assistant": lambda: client.nc.request(
                f"$JS.API.CONSUMER.CREATE.{stream}.lamabus-assistant", b"{}", timeout=10),
        }
        for subject, call in refused.items():
            with pytest.raises(LamaError) as caught:
                await guarded(client.nc, (subject,), call())
            assert caught.value.code is ErrorCode.FORBIDDEN, subject
        # The CLI's one line for it.
        assert str(caught.value).startswith("forbidden: this login may not publish to $JS.API.CONSUMER.CREATE")


@pytest.mark.model
async def test_the_service_itself_is_never_refused(secured: LamabusService, caplog: pytest.LogCaptureFixture) -> None:
    """A conversation, an API call of every kind the node makes, a registry event: the service role has all
    a node needs (a refusal would be logged by the node's connection as `forbidden`)."""
    async with await _as(secured, "admin") as admin:
        await admin.call(TopicList())
        items = [item async for item in admin.ask("service-check", "Hi", timeout=120)]
        assert type(items[-1]).__name__ == "GenerationCompleted"
        from wire.api import TopicCreate

        await admin.call(TopicCreate(topic_id="made-by-admin"))
    refused = [r.getMessage() for r in caplog.records if "forbidden" in r.getMessage()]
    assert refused == [], refused


async def test_a_chat_user_limited_to_its_topics_is_refused_another_users(tmp_path: Path) -> None:
    """The narrower chat user of docs/security.md: `permissions("chat", topics=[...], inbox=...)`. NATS
    wildcards match whole tokens, so the user's topics are listed (alice-notes), not a prefix pattern."""
    alice = permissions("chat", topics=["alice-notes"], inbox="_INBOX_alice")
    users = [
        {"user": "svc", "password": "svc-password-0123456789", "permissions": permissions("service").server_config()},
        {"user": "alice", "password": "alice-password-0123456789", "permissions": alice.server_config()},
    ]
    config = "authorization {\n  users = " + json.dumps(users) + "\n}\n"
    from bus.auth.credentials import Credentials
    from bus.node.intake import StreamLimits, ensure_topics_stream
    from bus.subjects import Subjects

    async with EmbeddedNatsServer(tmp_path / "js", config=config) as server:
        assert server.url
        svc = await connect(server.url, credentials=Credentials(user="svc", password="svc-password-0123456789"))
        try:
            await ensure_topics_stream(svc.jetstream(), Subjects("lama"), duplicate_window=120,
                                       limits=StreamLimits())
            for topic in ("alice-notes", "bob-notes"):
                await svc.jetstream().publish(f"lama.topic.{topic}.msg", json.dumps({"type": "chat.message"}).encode())
            creds = Credentials(user="alice", password="alice-password-0123456789", inbox_prefix="_INBOX_alice")
            async with LamabusClient.connect(server.url, credentials=creds) as client:
                js = client.js
                from nats.js.api import AckPolicy, ConsumerConfig

                def named(topic: str) -> ConsumerConfig:
                    return ConsumerConfig(name=f"alice-{topic}", filter_subject=f"lama.topic.{topic}.msg",
                                          ack_policy=AckPolicy.NONE, inactive_threshold=10)

                mine = await js.add_consumer("LAMA_TOPICS", named("alice-notes"))
                assert mine.num_pending == 1
                theirs = "$JS.API.CONSUMER.CREATE.LAMA_TOPICS.alice-bob-notes.lama.topic.bob-notes.msg"
                with pytest.raises(LamaError) as caught:
                    await guarded(client.nc, (theirs,), js.add_consumer("LAMA_TOPICS", named("bob-notes")))
                assert caught.value.code is ErrorCode.FORBIDDEN
                # An unnamed consumer (no filter in the subject) could read everything: refused too.
                with pytest.raises(LamaError) as caught:
                    await guarded(client.nc, ("$JS.API.CONSUMER.CREATE.LAMA_TOPICS",),
                                  client.nc.request("$JS.API.CONSUMER.CREATE.LAMA_TOPICS", b"{}", timeout=10))
                assert caught.value.code is ErrorCode.FORBIDDEN
                # Posting: its own topic yes, bob's no.
                await guarded(client.nc, ("lama.topic.alice-notes.msg",), js.publish(
                    "lama.topic.alice-notes.msg", json.dumps({"type": "chat.message"}).encode()))
                with pytest.raises(LamaError) as caught:
                    await guarded(client.nc, ("lama.topic.bob-notes.msg",), js.publish(
                        "lama.topic.bob-notes.msg", json.dumps({"type": "chat.message"}).encode()))
                assert caught.value.code is ErrorCode.FORBIDDEN
                # Nor can it listen to bob's tokens, or to other users' inboxes.
                for subject in ("lama.topic.bob-notes.tok", "_INBOX.>"):
                    with client.nc.denials.watching(subject) as refused:
                        await client.nc.subscribe(subject)
                        await client.nc.flush()
                        assert (await asyncio.wait_for(refused, 5)).code is ErrorCode.FORBIDDEN
        finally:
            await svc.close()


def test_docs_security_roles_section_is_current() -> None:
    """docs/security.md carries the generated roles section verbatim (python -m bus.auth.roles prints it)."""
    doc = (ROOT / "docs" / "security.md").read_text()
    assert roles_markdown("lama") in doc, "docs/security.md is stale: paste `python -m bus.auth.roles` into it"


def test_grant_follows_the_table() -> None:
    names = {spec.name for spec in ENDPOINTS}
    assert grant("admin").endpoints == names == grant("service").endpoints
    assert grant("chat").endpoints == {"topics.list", "topics.get", "models.list", "diagnostics"}
    assert grant("chat").may("post") and grant("chat").may("history") and not grant("chat").may("answer")
    assert not grant("admin").may("answer") and grant("service").may("answer")
    with pytest.raises(ValueError):
        grant("root")  # type: ignore[arg-type]
    # Every user name of the embedded broker is one of these roles.
    assert set(USERS) == set(ROLES)


@pytest.mark.model
async def test_a_consumer_cannot_deliver_a_posted_message_to_an_admin_endpoint(secured: LamabusService) -> None:
    """A chat login may post any bytes to a topic (they are stored) and create consumers on the topic stream,
    whose deliver subject nats-server does not check against permissions. Delivered onto
    ``lama.api.models.remove`` (to the API's queue group ``q``), the bytes would be
    a request made with the broker's hands: the service refuses whatever a JetStream consumer delivers (its
    reply is the consumer's ack subject), and the model stays."""
    from nats.js.api import AckPolicy, ConsumerConfig

    from wire.api import DiagnosticsGet, ModelGet, ModelsList

    async with await _as(secured, "admin") as admin, await _as(secured, "chat") as chat:
        model_id = (await admin.call(ModelsList())).active_model_id
        assert model_id
        await chat.js.publish("lama.topic.smuggle.msg", json.dumps({"modelId": model_id}).encode())
        targets = {"lama.api.models.remove": "q"}  # the API's queue group: delivered there without the refusal
        for subject, group in targets.items():
            await chat.js.add_consumer("LAMA_TOPICS", ConsumerConfig(
                deliver_subject=subject, deliver_group=group, filter_subject="lama.topic.smuggle.msg",
                ack_policy=AckPolicy.EXPLICIT, inactive_threshold=30))
            for _ in range(200):  # bounded: the delivery is immediate, the refusal counted at once
                if (await admin.call(DiagnosticsGet())).api.errors.get(f"{subject}.forbidden"):
                    break
                await asyncio.sleep(0.05)
            assert (await admin.call(DiagnosticsGet())).api.errors.get(f"{subject}.forbidden"), subject
        assert not (await admin.call(ModelGet(model_id=model_id))).model.deleted
