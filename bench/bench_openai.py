"""The OpenAI gateway's cost: one stream through ``/v1/chat/completions`` ÷ the same stream on the bus.

    .venv/bin/python -m bench.bench_openai [--reps 7] [--tokens 128]

One ``lamabus serve --openai 127.0.0.1:0`` (a child process, on an embedded nats-server this
process starts) serves both sides; they run interleaved (bus, gateway, bus, gateway, ...), the
same greedy request each time (a counting prompt, ``temperature`` 0, ``seed`` 42, no stop
strings, ``max_tokens`` N):

* ``bus``: ``llm.generate_stream`` on a handle, tokens read from the inbox (bus/client.py's way);
* ``gateway``: aiohttp streaming ``POST /v1/chat/completions``, one SSE event per chunk.

tok/s = (tokens − 1) ÷ (last − first content chunk), as the client saw them. Then ``--concurrency``
clients (8) at once on each side, interleaved the same way: all their tokens ÷ (last − first token of any). With llama.cpp's
``llama-server`` cached (``python -m bench.llama_server_build``), its own ``/v1/chat/completions``
runs as a third side, shaped like the engine. Writes ``bench/openai.json`` and the keys
``openai_over_bus_tps`` and ``openai_over_llama_server_tps`` of ``bench/results.json``
(medians; the paired ratios beside them). No asserts: the figures are read, not judged here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from bench.serve_process import ServeProcess
from bus.broker.embedded import EmbeddedNatsServer
from bus.client import LamabusClient
from wire.api import ChatTurnIn, LlmGenerateStream, LlmInitialize, LlmRelease, LlmResult, LlmToken
from wire.params import GenerationParams

ROOT = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
PROMPT = "Count from 1 to 1000, separated by commas."
_item = msgspec.json.Decoder(LlmToken | LlmResult)


def _tps(tokens: int, first: float | None, last: float) -> float | None:
    return (tokens - 1) / (last - first) if first is not None and tokens > 1 and last > first else None


async def bus_side(client: LamabusClient, handle: str, n: int) -> dict[str, Any]:
    inbox = client.nc.new_inbox()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_msg(msg) -> None:
        queue.put_nowait(msg.data)

    sub = await client.nc.subscribe(inbox, cb=on_msg)
    try:
        t0 = time.perf_counter()
        request = asyncio.create_task(client.call(LlmGenerateStream(
            handle=handle, messages=[ChatTurnIn("user", PROMPT)], subject=inbox,
            params=GenerationParams(max_tokens=n, temperature=0.0, seed=42, stop=[])), timeout=600))
        first, last = None, 0.0
        while True:
            item = _item.decode(await queue.get())
            t = time.perf_counter()
            if isinstance(item, LlmResult):
                break
            if item.channel == "content" and item.text:
                first = first if first is not None else t
                last = t
        await request
        return {"tokens": item.tokens, "ttft_s": (first or t) - t0, "tps": _tps(item.tokens, first, last),
                "t_first": first, "t_last": last}
    finally:
        await sub.unsubscribe()


async def openai_side(http: aiohttp.ClientSession, url: str, n: int, model: str | None = MODEL) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": n, "temperature": 0.0,
                            "seed": 42, "stop": [], "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    first, last, tokens = None, 0.0, 0
    t0 = time.perf_counter()
    async with http.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {(await r.text())[:300]}")
        async for raw in r.content:
            t = time.perf_counter()
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    first = first if first is not None else t
                    last = t
    return {"tokens": tokens, "ttft_s": (first or last) - t0, "tps": _tps(tokens, first, last), "t_first": first,
            "t_last": last}


async def together(k: int, one) -> float | None:
    """``k`` streams at once: their tokens ÷ (last token of any − first token of any)."""
    runs = await asyncio.gather(*(one() for _ in range(k)))
    firsts = [r["t_first"] for r in runs if r["t_first"] is not None]
    span = max(r["t_last"] for r in runs) - min(firsts) if firsts else 0.0
    return sum(r["tokens"] for r in runs) / span if span > 0 else None


def _median(runs: list[dict[str, Any]], key: str = "tps") -> float | None:
    xs = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(xs) if xs else None


async def llama_server_peer(tmp: Path):
    """llama-server shaped like the engine, when its binary is cached; else None."""
    from bench.llama_server_build import cached_binaries
    from bench.peer_llama_server import LlamaServer, ServerShape
    from handlers.catalog import bundled_model_path
    from wire.params import DEFAULTS

    binaries = cached_binaries()
    model = bundled_model_path()
    if binaries is None or model is None:
        return None
    shape = ServerShape(threads=DEFAULTS.n_threads, parallel=DEFAULTS.n_seq_max, n_ctx_per_seq=DEFAULTS.n_ctx,
                        n_batch=DEFAULTS.n_batch)
    server = LlamaServer(binaries["llama-server"], str(model), shape, tmp / "llama-server.log")
    await server.start()
    return server


async def run(reps: int, n: int, concurrency: int = 8) -> dict[str, Any]:
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-openai-") as d:
        tmp = Path(d)
        config = tmp / "lamabus.toml"
        config.write_text('[lamabus]\nopenai = "127.0.0.1:0"\nweb = "off"\nanalysis = false\nmetrics = "off"\n')
        async with EmbeddedNatsServer(tmp / "js") as nats_server:
            serve = ServeProcess(nats_server.url, tmp / "data", config, strict=False)
            await serve.start(timeout=120)
            peer = None
            try:
                url = (tmp / "data" / "openai.url").read_text().strip()
                peer = await llama_server_peer(tmp)
                async with LamabusClient.connect(nats_server.url) as client, aiohttp.ClientSession(
                        timeout=aiohttp.ClientTimeout(total=600)) as http:
                    h = await client.call(LlmInitialize(model_id=MODEL), timeout=300)
                    sides: dict[str, list[dict[str, Any]]] = {"bus": [], "gateway": [], "llama_server": []}
                    # Warm-up: each side once (model loaded, prompt cached, connections made).
                    print("warm-up", file=sys.stderr)
                    await bus_side(client, h.handle, n)
                    await openai_side(http, url, n)
                    if peer is not None:
                        await openai_side(peer.http, peer.url, n, model=None)
                    for rep in range(reps):
                        sides["bus"].append(await bus_side(client, h.handle, n))
                        sides["gateway"].append(await openai_side(http, url, n))
                        if peer is not None:
                            sides["llama_server"].append(await openai_side(peer.http, peer.url, n, model=None))
                        print(f"rep {rep + 1}/{reps}: " + ", ".join(
                            f"{k} {v[-1]['tps']:.1f} tok/s" for k, v in sides.items() if v and v[-1]["tps"]),
                            file=sys.stderr)
                    # ``concurrency`` clients at once on each side, interleaved the same way.
                    crowd: dict[str, list[float | None]] = {"bus": [], "gateway": [], "llama_server": []}
                    for rep in range(reps if concurrency > 1 else 0):
                        crowd["bus"].append(await together(concurrency, lambda: bus_side(client, h.handle, n)))
                        crowd["gateway"].append(await together(concurrency, lambda: openai_side(http, url, n)))
                        if peer is not None:
                            crowd["llama_server"].append(await together(
                                concurrency, lambda: openai_side(peer.http, peer.url, n, model=None)))
                        print(f"{concurrency} streams, rep {rep + 1}/{reps}: " + ", ".join(
                            f"{k} {v[-1]:.1f} tok/s" for k, v in crowd.items() if v and v[-1]), file=sys.stderr)
                    await client.call(LlmRelease(handle=h.handle))
            finally:
                if peer is not None:
                    await peer.stop()
                await serve.stop()
    paired = [g["tps"] / b["tps"] for b, g in zip(sides["bus"], sides["gateway"]) if b["tps"] and g["tps"]]
    out: dict[str, Any] = {
        "command": f"python -m bench.bench_openai --reps {reps} --tokens {n} --concurrency {concurrency}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "tokens": n, "reps": reps,
        "median_tps": {k: _median(v) for k, v in sides.items()},
        "median_ttft_ms": {k: (m * 1000 if (m := _median(v, "ttft_s")) is not None else None)
                           for k, v in sides.items()},
        "paired_openai_over_bus": statistics.median(paired) if paired else None,
        "runs": sides,
        "concurrent": {"streams": concurrency, "aggregate_tps": crowd,
                       "median_aggregate_tps": {k: statistics.median(v) if (v := [x for x in xs if x]) else None
                                                for k, xs in crowd.items()}},
    }
    med = out["median_tps"]
    out["openai_over_bus_tps"] = med["gateway"] / med["bus"] if med["gateway"] and med["bus"] else None
    out["openai_over_llama_server_tps"] = (med["gateway"] / med["llama_server"]
                                           if med["gateway"] and med["llama_server"] else None)
    agg = out["concurrent"]["median_aggregate_tps"]
    out["openai_over_bus_tps_concurrent"] = agg["gateway"] / agg["bus"] if agg["gateway"] and agg["bus"] else None
    if peer is None:
        out["llama_server"] = "not measured: no cached llama-server (python -m bench.llama_server_build builds it)"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=8, help="clients at once in the second part (1: none)")
    args = ap.parse_args(argv)
    out = asyncio.run(run(args.reps, args.tokens, args.concurrency))
    (ROOT / "openai.json").write_text(json.dumps(out, indent=2) + "\n")
    results_path = ROOT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for key in ("openai_over_bus_tps", "openai_over_llama_server_tps", "openai_over_bus_tps_concurrent"):
        results[key] = out[key]
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("median_tps", "median_ttft_ms", "openai_over_bus_tps",
                                          "paired_openai_over_bus", "openai_over_llama_server_tps",
                                          "openai_over_bus_tps_concurrent")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
