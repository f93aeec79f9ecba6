"""The admin CLI (bus/cli/registry.py) against a running service: tables for people, --json for scripts."""

from __future__ import annotations

import json
import sys

import anyio
import pytest

from bus.cli.main import main
from tests.test_api import BUNDLED, tiny_gguf
from wire.api import DiagnosticsGet, ModelImport, TopicCreate


def conn(service) -> list[str]:
    return ["--nats-url", service.url, "--data-dir", service.settings.data_dir, "--prefix", service.settings.prefix]


async def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``lamabus ARGV`` in a worker thread (it runs its own event loop) and capture what it printed."""
    capsys.readouterr()
    rc = await anyio.to_thread.run_sync(main, list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


async def cli_json(capsys, *argv: str):
    rc, out, err = await cli(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


async def test_models_list_and_show(service, capsys):
    c = conn(service)
    listing = await cli_json(capsys, "models", "list", *c)
    assert listing["type"] == "model.list" and listing["activeModelId"] == BUNDLED
    assert [m["id"] for m in listing["models"]] == [BUNDLED] and listing["models"][0]["personId"]
    rc, out, _ = await cli(capsys, "models", "list", *c)
    assert rc == 0 and BUNDLED in out and "active" in out and "ID" in out
    shown = await cli_json(capsys, "models", "show", BUNDLED, *c)
    assert shown["model"]["id"] == BUNDLED and shown["model"]["checksum"]
    rc, out, _ = await cli(capsys, "models", "show", BUNDLED, *c)
    assert rc == 0 and "personId" in out and "checksum" in out
    rc, out, err = await cli(capsys, "models", "show", "ghost", *c)
    assert rc == 1 and out == "" and "error [model_not_found]" in err


async def test_models_import_update_activate_rm(service, capsys):
    c = conn(service)
    tiny_gguf(service)
    imported = await cli_json(capsys, "models", "import", "tiny.gguf", "--name", "Tiny One", "--temperature", "0.5",
                              *c)
    assert (imported["model"]["id"], imported["model"]["temperature"]) == ("tiny-one", 0.5)
    updated = await cli_json(capsys, "models", "update", "tiny-one", "--max-tokens", "42", "--stop", "END",
                             "--stop", "###", "--context-size", "1024", "--flash-attention", "off", "--system-prompt", "Be brief.", *c)
    m = updated["model"]
    assert (m["maxTokens"], m["stop"], m["contextSize"], m["systemPrompt"]) == (42, ["END", "###"], 1024, "Be brief.")
    assert m["flashAttention"] == "off"
    rc, _, err = await cli(capsys, "models", "update", "tiny-one", *c)
    assert rc == 1 and "error [bad_request]" in err
    rc, _, err = await cli(capsys, "models", "update", "tiny-one", "--max-tokens", "0", *c)
    assert rc == 1 and "error [bad_request]" in err and "maxTokens" in err
    rc, _, err = await cli(capsys, "models", "update", "tiny-one", "--top-k", "3", "--expected-version", "1", *c)
    assert rc == 1 and "error [conflict]" in err
    rc, out, _ = await cli(capsys, "models", "activate", "tiny-one", *c)
    assert rc == 0 and "tiny-one is the active model" in out
    removed = await cli_json(capsys, "models", "rm", "tiny-one", *c)
    assert removed["model"]["deleted"] is True
    everything = await cli_json(capsys, "models", "list", "--all", *c)
    assert {m["id"]: m["deleted"] for m in everything["models"]} == {BUNDLED: False, "tiny-one": True}
    rc, out, _ = await cli(capsys, "models", "list", "--all", *c)
    assert "removed" in out


@pytest.mark.model
async def test_models_load_and_unload(service, capsys):
    c = conn(service)
    rc, out, err = await cli(capsys, "models", "load", BUNDLED, *c)
    assert rc == 0 and f"{BUNDLED} is loaded" in out, err
    unloaded = await cli_json(capsys, "models", "unload", BUNDLED, *c)
    assert (unloaded["wasLoaded"], unloaded["loaded"]) == (True, [])
    rc, out, _ = await cli(capsys, "models", "unload", BUNDLED, *c)
    assert rc == 0 and "was not loaded" in out


async def test_catalog_and_topics(service, client, capsys):
    c = conn(service)
    catalog = await cli_json(capsys, "catalog", *c)
    assert BUNDLED in [e["id"] for e in catalog["models"]] and catalog["registered"] == [BUNDLED]
    rc, out, _ = await cli(capsys, "catalog", *c)
    assert rc == 0 and "tinyllama-1-1b" in out and "REGISTERED" in out

    created = await cli_json(capsys, "topics", "create", "demo-1", "--name", "Demo", "--created-by", "ana", *c)
    assert (created["topic"]["id"], created["topic"]["modelId"], created["topic"]["createdBy"]) == (
        "demo-1", BUNDLED, "ana")
    rc, _, err = await cli(capsys, "topics", "create", "demo-1", *c)
    assert rc == 1 and "error [conflict]" in err
    rc, _, err = await cli(capsys, "topics", "create", "bad topic", *c)
    assert rc == 1 and "error [bad_request]" in err
    bound = await cli_json(capsys, "topics", "bind", "demo-1", BUNDLED, *c)
    assert bound["topic"]["boundModelId"] == BUNDLED
    rc, out, _ = await cli(capsys, "topics", "list", *c)
    assert rc == 0 and "demo-1" in out and BUNDLED in out
    unbound = await cli_json(capsys, "topics", "bind", "demo-1", "--unbind", *c)
    assert unbound["topic"]["boundModelId"] is None and unbound["topic"]["modelId"] == BUNDLED
    shown = await cli_json(capsys, "topics", "show", "demo-1", *c)
    assert shown["topic"]["name"] == "Demo"
    rc, out, _ = await cli(capsys, "topics", "list", *c)
    assert f"{BUNDLED} (active)" in out
    listing = await cli_json(capsys, "topics", "list", *c)
    assert [t["id"] for t in listing["topics"]] == ["demo-1"]
    rc, _, err = await cli(capsys, "topics", "show", "nowhere", *c)
    assert rc == 1 and "error [not_found]" in err


async def test_registry_events(service, client, capsys):
    c = conn(service)
    await client.call(TopicCreate(topic_id="log-me"))
    rc, out, err = await cli(capsys, "registry", "events", "--json", *c)
    assert rc == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["position"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "model.imported" and events[0]["streamId"] == f"model-{BUNDLED}"
    assert events[-1]["type"] == "topic.created" and events[-1]["streamId"] == "topic-log-me"
    rc, out, _ = await cli(capsys, "registry", "events", "--json", "--from", str(len(events)), *c)
    assert [json.loads(line)["position"] for line in out.splitlines()] == [len(events)]
    rc, out, _ = await cli(capsys, "registry", "events", *c)
    assert rc == 0 and "model.imported" in out and "topic-log-me" in out
    rc, out, _ = await cli(capsys, "registry", "events", "--from", "999", *c)
    assert rc == 0 and "no events after position 998" in out
    rc, _, err = await cli(capsys, "registry", "events", "--data-dir", str(service.settings.data_path / "none"))
    assert rc == 1 and "error [not_found]" in err


async def test_registry_rebuild_equals_the_service_state(service, client, capsys):
    c = conn(service)
    tiny_gguf(service)
    await client.call(ModelImport(path="tiny.gguf"))
    await client.call(TopicCreate(topic_id="r1", model_id="tiny"))
    report = await cli_json(capsys, "registry", "rebuild", *c)
    assert report["equal"] is True and report["differences"] == []
    assert report["rebuilt"] == report["service"]
    assert report["rebuilt"]["models"] == 2 and report["rebuilt"]["topics"] == 1
    assert report["rebuilt"]["position"] == (await client.call(DiagnosticsGet())).registry.position
    rc, out, _ = await cli(capsys, "registry", "rebuild", *c)
    assert rc == 0 and "equals the running service's" in out
    offline = await cli_json(capsys, "registry", "rebuild", "--offline", *c)
    assert offline["service"] is None and offline["equal"] is None
    assert offline["rebuilt"] == report["rebuilt"]


async def test_registry_events_follow(service, client):
    argv = [sys.executable, "-m", "bus.cli", "registry", "events", "--follow", "--json", *conn(service)]
    async with await anyio.open_process(argv) as proc:
        assert proc.stdout is not None
        buffer = b""

        async def next_event() -> dict:
            nonlocal buffer
            while b"\n" not in buffer:
                buffer += await proc.stdout.receive()
            line, buffer = buffer.split(b"\n", 1)
            return json.loads(line)

        try:
            with anyio.fail_after(60):
                first = await next_event()
                assert first["position"] == 1
                position = (await client.call(DiagnosticsGet())).registry.position
                while first["position"] < position:
                    first = await next_event()
                # Something new is committed: the follower prints it.
                await client.call(TopicCreate(topic_id="followed"))
                event = await next_event()
                assert (event["type"], event["streamId"], event["position"]) == (
                    "topic.created", "topic-followed", position + 1)
        finally:
            proc.terminate()
            await proc.wait()


async def test_no_service_is_a_clean_error(service, capsys):
    # The broker is there, but nothing answers under this prefix.
    rc, out, err = await cli(capsys, "models", "list", "--nats-url", service.url, "--prefix", "nobody")
    assert rc == 1 and out == "" and "no lamabus service answers nobody.api.models.list" in err


async def test_topics_list_and_show_print_the_analysis(service, client, capsys):
    from wire.records import TopicAnalysis

    c = conn(service)
    await cli_json(capsys, "topics", "create", "about", *c)
    rc, out, _ = await cli(capsys, "topics", "show", "about", *c)
    assert rc == 0 and "analysis" not in out.split("topic about", 1)[1].replace("analysisEnabled", "")
    await service.registry.record_analysis("about", TopicAnalysis(
        title="Baking bread at home", keywords=("bread", "yeast", "oven"), summary="How to bake bread. It rises.",
        language="en", based_on_message_id="r-1", model_id=BUNDLED, reply_count=1, analysed_at=0))
    rc, out, _ = await cli(capsys, "topics", "list", *c)
    assert rc == 0 and "Baking bread at home (en)" in out
    rc, out, _ = await cli(capsys, "topics", "show", "about", *c)
    assert rc == 0 and "bread, yeast, oven" in out and "How to bake bread. It rises." in out and "r-1" in out
    shown = await cli_json(capsys, "topics", "show", "about", *c)
    assert shown["topic"]["analysis"]["keywords"] == ["bread", "yeast", "oven"]
    assert shown["topic"]["analysisEnabled"] is True
    off = await cli_json(capsys, "topics", "analysis", "about", "off", *c)
    assert off["topic"]["analysisEnabled"] is False and not service.registry.view.topics["about"].analysis_enabled
    rc, out, _ = await cli(capsys, "topics", "list", *c)
    assert "Baking bread at home (en)" in out  # the last one stays shown; no new ones come
    assert (await cli_json(capsys, "topics", "analysis", "about", "on", *c))["topic"]["analysisEnabled"] is True
    rc, _, err = await cli(capsys, "topics", "analysis", "bad topic", "off", *c)
    assert rc == 1 and "error [bad_request]" in err


async def test_node_flag_asks_the_named_node(service, capsys):
    c, node = conn(service), service.settings.node_name
    rc, out, err = await cli(capsys, "models", "load", BUNDLED, "--node", node, *c)
    assert rc == 0 and f"{BUNDLED} is loaded on node {node}" in out, err
    diag = await cli_json(capsys, "diagnostics", "--node", node, *c)  # --json, as every command (issue 22)
    assert diag["service"]["node"] == node
    (model,) = [m for m in diag["service"]["engine"]["models"] if m["handles"]]
    assert model["gpu"]["nGpuLayersRequested"] == "auto"  # the default
    rc, out, err = await cli(capsys, "diagnostics", "--node", node, *c)  # for people: where each model runs
    assert rc == 0 and f"node {node}" in out and "models loaded" in out, err
    used = model["gpu"]["nGpuLayersUsed"]
    assert (f"{used}/{model['gpu']['layers']} layers on" if used else "CPU: ") in out
    unloaded = await cli_json(capsys, "models", "unload", BUNDLED, "--node", node, *c)
    assert (unloaded["wasLoaded"], unloaded["node"]) == (True, node)
    rc, out, err = await cli(capsys, "diagnostics", "--node", "nobody", *c)
    assert rc == 1 and out == "" and "node nobody is not serving" in err


