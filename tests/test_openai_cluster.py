"""The OpenAI gateway in front of two lamabus nodes on a 3-server NATS cluster (issue 23): a gateway of its own,
connected to the third server, streams from whichever node took its handle; that node SIGKILLed mid-stream ends
the stream with an error (never a hang), and the next request is answered by the node that is left."""

from __future__ import annotations

import time

import anyio
import openai
import pytest

from bench.serve_process import ServeProcess
from bus.config import Settings
from bus.gateway.auth import Keys
from bus.gateway.server import GatewayServer
from tests.conftest import entered_in_own_task
from tests.test_api import BUNDLED
from tests.test_cluster_nodes import _config, cluster, nc, wait_owned_by  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.model]

ASK = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]


@pytest.mark.timeout(420)
async def test_a_node_killed_mid_stream_ends_the_stream_with_an_error(cluster, nc, tmp_path):
    procs = {name: ServeProcess(",".join(cluster.urls_from(server)), tmp_path / name,
                                _config(tmp_path / f"{name}.toml", name), strict=True)
             for name, server in (("a", 1), ("b", 2))}
    settings = Settings(data_dir=str(tmp_path / "gw"), openai="127.0.0.1:0", web="off")
    gateway = GatewayServer(settings, ",".join(cluster.urls_from(3)), "127.0.0.1", 0, keys=Keys())
    try:
        for proc in procs.values():
            await proc.start()
        await wait_owned_by(nc, {"a", "b"})
        async with entered_in_own_task(gateway) as gw, openai.AsyncOpenAI(
                base_url=f"{gw.url}/v1", api_key="none", max_retries=0, timeout=120) as oa:
            first = await oa.chat.completions.create(model=BUNDLED, messages=ASK, max_tokens=6, temperature=0.0)
            assert first.choices[0].message.content
            holder = gw.upstream._handles[BUNDLED].node  # the node whose engine took the gateway's handle
            assert holder in procs

            stream = await oa.chat.completions.create(model=BUNDLED, messages=ASK, max_tokens=2000, temperature=0.0,
                                                      stop=[], stream=True)
            text, killed = "", time.monotonic()
            with pytest.raises(openai.APIError) as failure:
                with anyio.fail_after(60):
                    async for chunk in stream:
                        if chunk.choices:
                            text += chunk.choices[0].delta.content or ""
                        if len(text) > 20 and procs[holder].alive:
                            await procs[holder].kill()
                            killed = time.monotonic()
            took = time.monotonic() - killed
            assert "stopped" in str(failure.value) or "not serving" in str(failure.value), failure.value
            assert took < 15, took
            print(f"\nnode {holder} killed mid-stream -> the stream's error after {took:.2f}s")

            # The next request goes to the node that is left.
            again = await oa.chat.completions.create(model=BUNDLED, messages=ASK, max_tokens=6, temperature=0.0)
            assert again.choices[0].message.content == first.choices[0].message.content
            assert gw.upstream._handles[BUNDLED].node not in (None, holder)
    finally:
        for proc in procs.values():
            await proc.aclose()
