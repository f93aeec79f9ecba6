"""Requests about one node's engine reach that node (issue 11, "routed to, or name, that node"), on a real
3-server NATS cluster with two lamabus nodes, each connected to a different server.

Every node serves the API in one queue group and again on its own subjects, ``lama.api.node.<id>.*``.
An llm handle names its node; a request on it that reaches another node is handed on over the bus.
"""

from __future__ import annotations

import anyio
import msgspec
import nats
import pytest

from bus.client import LamabusClient
from tests.test_api import BUNDLED
from tests.test_cluster_nodes import cluster, nc, node, node_settings, wait_owned_by  # noqa: F401  (fixtures)
from wire.api import (
    DiagnosticsGet,
    LlmCancel,
    LlmGenerate,
    LlmGenerateStream,
    LlmInitialize,
    LlmRelease,
    LlmResult,
    LlmToken,
    MetricsGet,
    ModelLoad,
    ModelsList,
    ModelUnload,
)
from wire.errors import ErrorCode, LamaError
from wire.params import GenerationParams

pytestmark = [pytest.mark.slow, pytest.mark.model]

GREEDY = GenerationParams(max_tokens=4, temperature=0.0, seed=1)


async def client_on(cluster, server: int) -> LamabusClient:
    return LamabusClient(await nats.connect(cluster.node(server).url, connect_timeout=2), owns_connection=True)


async def refused(call) -> LamaError:
    with pytest.raises(LamaError) as exc:
        await call
    return exc.value


async def test_a_handle_made_on_one_node_is_used_through_another(cluster, nc, tmp_path):
    async with node(node_settings(cluster, 1, "a", tmp_path)) as a, node(node_settings(cluster, 2, "b", tmp_path)) as b:
        assert a.api is not None and b.api is not None
        on_a, on_b = await client_on(cluster, 1), await client_on(cluster, 2)
        try:
            h = await on_a.call(LlmInitialize(model_id=BUNDLED), node="a", timeout=120)
            assert h.node == "a" and h.handle.startswith("a:") and h.handle in a.api.llm.handles
            assert not b.api.llm.handles

            # Through node b's own table (which answers, never hands on): the handle is a's, and it says so.
            wrong = await refused(on_b.call(LlmGenerate(handle=h.handle, prompt="Hi", params=GREEDY), node="b"))
            assert wrong.code is ErrorCode.NOT_FOUND and wrong.details["node"] == "a"

            # Node b's shared table hands it to a: asked of b directly, and through the queue group from b's server.
            forwarded = await b.api.llm_generate(LlmGenerate(handle=h.handle, prompt="The sky is", params=GREEDY,
                                                             request_id="via-b"))
            assert isinstance(forwarded, LlmResult) and forwarded.handle == h.handle and forwarded.tokens > 0
            for i in range(3):  # whichever node the queue group picks, the handle works
                result = await on_b.call(LlmGenerate(handle=h.handle, prompt="The sky is", params=GREEDY,
                                                     request_id=f"queue-{i}"), timeout=120)
                assert result.text == forwarded.text and result.request_id == f"queue-{i}"

            # A stream through b: a publishes the chunks on the caller's subject, b relays the result.
            stream = await on_b.nc.subscribe("stream.via-b")
            await on_b.nc.flush()
            streamed = await b.api.llm_generate_stream(LlmGenerateStream(
                handle=h.handle, prompt="The sky is", params=GREEDY, subject="stream.via-b", request_id="s1"))
            chunks: list[LlmToken] = []
            with anyio.fail_after(30):
                while True:
                    item = msgspec.json.decode((await stream.next_msg(timeout=30)).data)
                    if item["type"] == "llm.result":
                        break
                    chunks.append(msgspec.json.decode(msgspec.json.encode(item), type=LlmToken))
            assert "".join(c.text for c in chunks) == streamed.text == forwarded.text

            # A request id does not name its node: a cancel that reaches b asks a, which runs it.
            long = GenerationParams(max_tokens=400, temperature=0.0, seed=1, stop=[])
            first = await on_a.nc.subscribe("stream.long")
            await on_a.nc.flush()
            async with anyio.create_task_group() as tg:
                results: list[LlmResult] = []

                async def run_long() -> None:
                    results.append(await on_a.call(LlmGenerateStream(
                        handle=h.handle, prompt="1, 2, 3, 4,", params=long, subject="stream.long", request_id="long"),
                        node="a", timeout=300))

                tg.start_soon(run_long)
                await first.next_msg(timeout=60)  # the engine is generating it
                cancel = await b.api.llm_cancel(LlmCancel(request_id="long"))
                assert cancel.cancelled
            assert results[0].finish_reason == "cancelled"
            assert (await refused(b.api.llm_cancel(LlmCancel(request_id="nowhere")))).code is ErrorCode.NOT_FOUND

            # Released through b, gone on a.
            await b.api.llm_release(LlmRelease(handle=h.handle))
            assert h.handle not in a.api.llm.handles
            gone = await refused(on_b.call(LlmGenerate(handle=h.handle, prompt="Hi", params=GREEDY), timeout=60))
            assert gone.code is ErrorCode.NOT_FOUND
        finally:
            await on_a.close()
            await on_b.close()
        # A handle whose node is not serving: not_found naming it.
        stale = await refused(b.api.llm_generate(LlmGenerate(handle="c:ctx-0", prompt="Hi", params=GREEDY)))
        assert stale.code is ErrorCode.NOT_FOUND and stale.details["node"] == "c"


async def test_load_diagnostics_and_metrics_name_their_node(cluster, nc, tmp_path):
    async with node(node_settings(cluster, 1, "a", tmp_path)) as a, \
            node(node_settings(cluster, 2, "b", tmp_path, metrics="bus")) as b:
        assert a.models is not None and b.models is not None
        await wait_owned_by(nc, {"a", "b"})
        client = LamabusClient(nc)
        loaded = await client.call(ModelLoad(model_id=BUNDLED), node="b", timeout=120)
        assert loaded.node == "b" and BUNDLED in loaded.loaded
        assert BUNDLED in b.models.loaded_ids() and BUNDLED not in a.models.loaded_ids()
        assert BUNDLED not in (await client.call(ModelsList(), node="a")).loaded

        for name, svc in (("a", a), ("b", b)):
            diag = (await client.call(DiagnosticsGet(), node=name)).service
            assert diag.node == name
            assert diag.partitions == svc.intake.owned and diag.partitions  # type: ignore[union-attr]
        assert (await client.call(MetricsGet(), node="b")).node == "b"
        off = await refused(client.call(MetricsGet(), node="a"))  # metrics are off on a: a says so, not b
        assert off.code is ErrorCode.NOT_FOUND

        unloaded = await client.call(ModelUnload(model_id=BUNDLED), node="b", timeout=60)
        assert unloaded.node == "b" and unloaded.was_loaded and BUNDLED not in b.models.loaded_ids()
        missing = await refused(client.call(DiagnosticsGet(), node="nobody", timeout=5))
        assert missing.code is ErrorCode.NOT_FOUND and missing.details["node"] == "nobody"
        bad = await refused(client.call(DiagnosticsGet(), node="a.>", timeout=5))
        assert bad.code is ErrorCode.BAD_REQUEST



async def test_a_request_handed_to_a_node_that_dies_ends_with_not_found(cluster, nc, tmp_path):
    """Node b hands a stream on a's handle to a; a is SIGKILLed mid-stream: b's caller hears not_found naming a
    once a's heartbeat is gone, not after the forward's long timeout."""
    import time

    from bench.serve_process import ServeProcess
    from bus.config import Settings
    from tests.test_cluster_nodes import _config

    a = ServeProcess(",".join(cluster.urls_from(1)), tmp_path / "a", _config(tmp_path / "a.toml", "a"), strict=True)
    try:
        await a.start()
        async with node(node_settings(cluster, 2, "b", tmp_path)) as b:
            assert b.api is not None and b.intake is not None
            with anyio.fail_after(30):
                while "a" not in b.intake.live:  # type: ignore[attr-defined]
                    await anyio.sleep(0.1)  # b reads a's heartbeat every tick
            h = await LamabusClient(nc).call(LlmInitialize(model_id=BUNDLED), node="a", timeout=120)
            stream = await nc.subscribe("stream.doomed")
            await nc.flush()
            endless = GenerationParams(max_tokens=2000, temperature=0.0, seed=1, stop=[])
            failure: list[LamaError] = []
            async with anyio.create_task_group() as tg:
                async def doomed() -> None:
                    failure.append(await refused(b.api.llm_generate_stream(LlmGenerateStream(  # type: ignore[union-attr]
                        handle=h.handle, prompt="1, 2, 3,", params=endless, subject="stream.doomed",
                        request_id="doomed"))))

                tg.start_soon(doomed)
                await stream.next_msg(timeout=120)  # a is generating it
                await a.kill()
                killed = time.monotonic()
            took = time.monotonic() - killed
            (exc,) = failure
            assert exc.code is ErrorCode.NOT_FOUND and exc.details["node"] == "a", exc
            assert took < Settings().lease_ttl + 5
    finally:
        await a.aclose()
