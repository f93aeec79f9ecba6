"""The llama-server side of the bench, without the binaries: output parsing, the command line, the cache key,
the streamed /completion client (against a stand-in server on loopback) and the report's side-by-side table."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp import web

from bench import llama_server_build, report
from bench.peer_llama_server import LlamaPeer, LlamaServer, ServerShape, parse_batched_bench

# llama-batched-bench's output as it prints it (markdown table), log lines around it.
RECORDED_MD = """\
llama_context: flash_attn    = auto
main: n_kv_max = 16384, n_batch = 512, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, is_tg_separate = 0, \
n_gpu_layers = 0, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    44 |    128 |    8 |   1376 |    0.412 |   854.37 |    4.911 |   208.51 |    5.323 |   258.51 |

llama_perf_context_print:        load time =     112.40 ms
"""

RECORDED_JSONL = (
    '{"n_kv_max": 16384, "n_batch": 512, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": 0, '
    '"n_threads": 2, "n_threads_batch": 2, "pp": 44, "tg": 128, "pl": 8, "n_kv": 1376, "t_pp": 0.412000, '
    '"speed_pp": 854.368932, "t_tg": 4.911000, "speed_tg": 208.511505, "t": 5.323000, "speed": 258.507421}\n'
)


def test_parse_batched_bench_markdown() -> None:
    rows = parse_batched_bench(RECORDED_MD)
    assert rows == [{"pp": 44, "tg": 128, "pl": 8, "n_kv": 1376, "t_pp": 0.412, "speed_pp": 854.37, "t_tg": 4.911,
                     "speed_tg": 208.51, "t": 5.323, "speed": 258.51}]


def test_parse_batched_bench_jsonl_and_nothing() -> None:
    rows = parse_batched_bench("main: loading\n" + RECORDED_JSONL)
    assert len(rows) == 1 and rows[0]["pl"] == 8 and abs(rows[0]["speed_tg"] - 208.51) < 0.01
    assert parse_batched_bench("error: unable to load model\n|  PP | TG |\n") == []


def test_server_shape_mirrors_the_engine() -> None:
    args = ServerShape(threads=2, parallel=8, n_ctx_per_seq=2048, n_batch=512).args("/m/model.gguf", 8080)
    joined = " ".join(args)
    for part in ("-m /m/model.gguf", "--host 127.0.0.1", "--port 8080", "-t 2", "-tb 2", "-np 8", "-c 16384",
                 "--no-kv-unified", "-b 512", "-ub 512", "-fa auto"):
        assert part in joined, part


def test_cache_key_follows_version_flags_and_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LAMABUS_GPU", raising=False)
    cpu = llama_server_build.cache_dir()
    assert cpu.is_relative_to(tmp_path / "lamabus" / "llama-server")
    assert cpu.name.startswith(f"llama.cpp-{llama_server_build.llama_cpp_version()}-")
    assert llama_server_build.cache_dir(mode="source") != cpu
    monkeypatch.setenv("LAMABUS_GPU", "cuda")
    assert "-DGGML_CUDA=ON" in llama_server_build.cmake_flags()
    assert llama_server_build.cache_dir() != cpu
    assert llama_server_build.cached_binaries() is None  # nothing built under this cache home


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def test_streamed_completion_is_timed_and_parsed(tmp_path: Path) -> None:
    """A stand-in for llama-server's /completion stream: content chunks, then the final chunk with timings."""
    seen: list[dict] = []

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def completion(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in ("Hello", "", " world"):
            await resp.write(_sse({"content": piece, "stop": False}))
            await asyncio.sleep(0.01)
        await resp.write(_sse({"content": "", "stop": True, "stop_type": "limit", "tokens_predicted": 3,
                               "timings": {"prompt_n": 10, "cache_n": 4, "prompt_ms": 5.5,
                                           "predicted_per_second": 99.0}}))
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/completion", completion)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server = LlamaServer(Path("/nonexistent"), "m.gguf", ServerShape(2, 8, 2048, 512), tmp_path / "log")
    import aiohttp

    server.port = port
    server.http = aiohttp.ClientSession()
    try:
        run = await server.complete("<prompt>", 3, id_slot=0)
    finally:
        await server.http.close()
        await runner.cleanup()
    assert seen[0]["n_predict"] == 3 and seen[0]["ignore_eos"] is True and seen[0]["stream"] is True
    assert seen[0]["temperature"] == 0.0 and seen[0]["id_slot"] == 0 and seen[0]["cache_prompt"] is True
    assert run.text == "Hello world" and run.tokens == 3 and run.finish == "length"
    assert run.prompt_tokens == 14 and run.cached_tokens == 4 and run.engine_ttft_ms == 5.5
    assert 0 < run.ttft_s <= run.t_last - run.t0 and run.t_last > run.t_first
    assert run.tps(3) is not None


def test_batch_results_and_report_table() -> None:
    acc = {"aggregate_tps": [150.0, 170.0, 160.0], "ttft_ms": [100.0 + i for i in range(24)], "short": [0, 0, 0],
           "bb_decode_tps": [200.0, 210.0, 205.0], "bb_prefill_s": [0.4] * 3, "bb_total_tps": [250.0] * 3,
           "bb_command": ["-m m.gguf -npl 8"]}
    out = LlamaPeer.batch_results(acc, [165.0, 168.0, 166.0], [200.0 + i for i in range(24)])
    assert out["llama_server_8_streams_tps"] == 160.0 and out["batched_bench_8_decode_tps"] == 205.0
    assert abs(out["batched8_over_llama_server"] - 166.0 / 160.0) < 1e-9
    assert out["ttft_p95_8_topics_over_llama_server"] > 1.0 and out["llama_server_batch"]["streams"] == 8

    results = {
        "single_stream": {"tokens": 128, "tps": {"bus": 100.0, "llama_server": 110.0}, "ttft_ms": {"bus": 50.0, "llama_server": 40.0},
                          "reps": 1, "runs_reaching_max_tokens": {}},
        "llama_server_one_stream_tps": 110.0, "bus_over_llama_server_tps": 100.0 / 110.0,
        "concurrency": [{"topics": 8, "aggregate_tps": 166.0, "ttft_p50_ms": 210.0, "ttft_p95_ms": 222.0,
                         "requests": 24, "stopped_before_max_tokens": 0}],
        "conversation": {"turns": 20, "per_turn": [{"turn": 20, "bus_ttft_ms": 190.0}]},
        "llama_server_turn20_ttft_ms": 200.0, "turn20_ttft_over_llama_server": 0.95,
        "llama_server": {"command": "llama-server -m m.gguf -np 8", "build": "b"},
        **out,
    }
    md = report.render(results)
    assert "## 3b. lamabus beside llama-server" in md
    assert "| One stream, tok/s (128 tokens, EOS ignored) | 100.0 | 110.0 | 0.909 |" in md
    assert "| Turn 20 of a conversation, TTFT ms | 190.0 | 200.0 | 0.950 |" in md
    missed = report.missed_targets(results)
    assert "bus_over_llama_server_tps" in missed and "turn20_ttft_over_llama_server" not in missed
    assert "batched8_over_raw_batched8" not in missed  # superseded by the batched-bench anchor
    assert "decode phase **205.0 tok/s**" in md
