"""The peer: llama.cpp's own ``llama-server`` and ``llama-batched-bench``, measured beside lamabus.

Both binaries come from bench/llama_server_build.py (the llama.cpp that the
installed llama-cpp-python was built from, same flags). The bus benchmark
(bench/bench_bus.py) runs them interleaved with its other sides when
``python -m bench --llama-server`` is given, or when the cached binaries exist.

llama-server is started once, on loopback, shaped like lamabus's engine: the
same model, ``-t``/``-tb`` = the engine's threads, ``-np`` = its sequences,
``-c`` = sequences × the per-sequence context (``--no-kv-unified``: each slot
its own cells, as in the engine), ``-b``/``-ub`` = its n_batch, flash attention
``auto`` (both defaults). Requests go to ``/completion`` with the prompt the
engine renders (engine.chat's template, through the raw loop's renderer),
``temperature 0``, ``seed 42``, no stop strings, ``n_predict`` and
``ignore_eos`` (so it always produces maxTokens), ``stream: true``; the client
is aiohttp (a dependency of lamabus) and times every streamed chunk as the bus
client times its token events: TTFT = just before the POST → first content
chunk; tok/s = (N − 1) ÷ (last − first content chunk).

``llama-batched-bench`` gives the batched anchor: ``-npl 8`` sequences with the
bench's prompt length and maxTokens, the same context shape; its decode phase
(``S_TG t/s``) replaces the raw batched loop's figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.stats import Run

# ---------------------------------------------------------------------------- llama-batched-bench


_MD_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|" + r"\s*([0-9.]+)\s*\|" * 6 + r"\s*$")
_MD_KEYS = ("pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed")


def parse_batched_bench(text: str) -> list[dict[str, float]]:
    """The result rows of ``llama-batched-bench``'s output (markdown table or ``--output-format jsonl``).

    Each row: pp, tg, pl, n_kv, t_pp, speed_pp, t_tg, speed_tg (the decode phase: pl × tg ÷ t_tg), t, speed.
    Log lines around the table are ignored.
    """
    rows: list[dict[str, float]] = []
    for line in text.splitlines():
        line = line.strip()
        m = _MD_ROW.match(line)
        if m:
            vals = [float(g) for g in m.groups()]
            row = dict(zip(_MD_KEYS, vals))
            for k in ("pp", "tg", "pl", "n_kv"):
                row[k] = int(row[k])
            rows.append(row)
            continue
        if line.startswith("{") and '"speed_tg"' in line:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            rows.append({k: obj[k] for k in _MD_KEYS if k in obj})
    return rows


def batched_bench(binary: Path, model: str, *, threads: int, n_ctx_per_seq: int, n_batch: int, prompt_tokens: int,
                  tokens: int, sequences: int, gpu_layers: int = 0, timeout: float = 300.0) -> dict[str, Any]:
    """One ``llama-batched-bench`` run: ``sequences`` prompts of ``prompt_tokens``, ``tokens`` decoded each."""
    cmd = [str(binary), "-m", model, "-c", str(n_ctx_per_seq * sequences), "-b", str(n_batch), "-ub", str(n_batch),
           "-t", str(threads), "-tb", str(threads), "-ngl", str(gpu_layers), "-fa", "auto", "-npp", str(prompt_tokens),
           "-ntg", str(tokens), "-npl", str(sequences)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)
    rows = parse_batched_bench(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0 or not rows:
        raise RuntimeError(f"llama-batched-bench failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-800:]}")
    row = rows[-1]
    return {"prefill_s": row["t_pp"], "prefill_tps": row["speed_pp"], "decode_s": row["t_tg"],
            "decode_tps": row["speed_tg"], "total_tps": row["speed"], "pp": row["pp"], "tg": row["tg"],
            "pl": row["pl"], "command": " ".join(cmd[1:]).replace(model, Path(model).name)}


# ---------------------------------------------------------------------------- llama-server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ServerShape:
    """The llama-server command line's knobs, set from the engine's diagnostics."""

    threads: int
    parallel: int
    n_ctx_per_seq: int
    n_batch: int
    flash_attention: str = "auto"
    gpu_layers: int = 0  # -ngl: the bench's --gpu-layers, as every side

    def args(self, model: str, port: int) -> list[str]:
        return ["-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(self.threads),
                "-tb", str(self.threads), "-np", str(self.parallel), "-c", str(self.n_ctx_per_seq * self.parallel),
                "--no-kv-unified", "-b", str(self.n_batch), "-ub", str(self.n_batch), "-fa", self.flash_attention,
                "-ngl", str(self.gpu_layers), "--no-webui"]


class LlamaServer:
    """``llama-server`` on a loopback port, in its own session; an aiohttp session to it."""

    def __init__(self, binary: Path, model: str, shape: ServerShape, log_path: Path) -> None:
        self.binary = binary
        self.model = model
        self.shape = shape
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: aiohttp.ClientSession | None = None
        self.command: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 120.0) -> None:
        self.port = free_port()
        self.command = [str(self.binary), *self.shape.args(self.model, self.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        # A fresh connection per request (force_close): llama-server's HTTP library closes an idle keep-alive
        # connection after a few seconds, and a pooled one it has just closed fails the next request. A loopback
        # connect costs well under a millisecond of the peer's TTFT. No pool limit below 8 streams at once.
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, force_close=True),
                                          timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with asyncio.timeout(5):
                    async with self.http.get(self.url + "/health") as r:
                        if r.status == 200:
                            return
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become healthy in time:\n" + self.log_tail())
            await asyncio.sleep(0.2)

    def command_line(self) -> str:
        return " ".join(["llama-server", *self.command[1:]]).replace(self.model, Path(self.model).name)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)

    async def complete(self, prompt: str, n: int, *, id_slot: int | None = None, cache_prompt: bool = True,
                       timeout: float = 600.0) -> Run:
        """One streamed ``/completion``: greedy, seed 42, no stop strings, exactly ``n`` tokens (EOS ignored)."""
        assert self.http is not None
        body: dict[str, Any] = {"prompt": prompt, "n_predict": n, "ignore_eos": True, "temperature": 0.0,
                                "seed": 42, "stop": [], "stream": True, "cache_prompt": cache_prompt}
        if id_slot is not None:
            body["id_slot"] = id_slot
        parts: list[str] = []
        t_first: float | None = None
        t_last = 0.0
        final: dict[str, Any] = {}
        async with asyncio.timeout(timeout):
            t0 = time.perf_counter()
            async with self.http.post(self.url + "/completion", json=body) as r:
                if r.status != 200:
                    raise RuntimeError(f"llama-server /completion: HTTP {r.status}: {(await r.text())[:300]}")
                async for raw in r.content:  # server-sent events, one "data: {...}" line per chunk
                    t = time.perf_counter()
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise RuntimeError(f"llama-server /completion: {chunk['error']}")
                    if chunk.get("content"):
                        if t_first is None:
                            t_first = t
                        t_last = t
                        parts.append(chunk["content"])
                    if chunk.get("stop"):
                        final = chunk
                        break
        if t_first is None:
            t_first = t_last = time.perf_counter()
        timings = final.get("timings") or {}
        tokens = int(final.get("tokens_predicted") or timings.get("predicted_n") or 0)
        finish = "length" if final.get("stop_type") == "limit" else (final.get("stop_type") or "unknown")
        prompt_n = timings.get("prompt_n")
        cache_n = timings.get("cache_n")
        return Run(side="llama_server", ttft_s=t_first - t0, tokens=tokens, finish=finish, t0=t0, t_first=t_first,
                   t_last=t_last, text="".join(parts),
                   prompt_tokens=int(prompt_n + (cache_n or 0)) if prompt_n is not None else None,
                   cached_tokens=int(cache_n) if cache_n is not None else None,
                   engine_tps=timings.get("predicted_per_second"), engine_ttft_ms=timings.get("prompt_ms"))

    async def props(self) -> dict[str, Any]:
        assert self.http is not None
        async with asyncio.timeout(10):
            async with self.http.get(self.url + "/props") as r:
                return await r.json() if r.status == 200 else {}


class LlamaPeer:
    """llama-server and llama-batched-bench as one side of the bus benchmark."""

    def __init__(self, directory: Path, model: str, shape: ServerShape, log_path: Path) -> None:
        self.directory = directory
        self.model = model
        self.shape = shape
        self.server = LlamaServer(directory / "llama-server", model, shape, log_path)

    async def start(self) -> None:
        await self.server.start()
        await self.server.complete("Say hello.", 8)  # page the weights in, as every other side is warmed

    async def stop(self) -> None:
        await self.server.stop()

    async def complete(self, prompt: str, n: int, *, id_slot: int | None = None) -> Run:
        return await self.server.complete(prompt, n, id_slot=id_slot)

    def describe(self) -> dict[str, Any]:
        info = {"command": self.server.command_line(), "binaries": str(self.directory)}
        with contextlib.suppress(OSError):
            info["build"] = (self.directory / "build-info.txt").read_text().strip()
        return info

    async def measure_batch(self, prompts: Sequence[str], prompt_tokens: int, n: int,
                            acc: dict[str, list[Any]]) -> str:
        """``len(prompts)`` streams at once through llama-server, then llama-batched-bench at that width.

        Appends to ``acc``: aggregate tok/s (all tokens ÷ (last token − first request), as for the bus), every
        TTFT in ms, streams that stopped short, and batched-bench's decode and prefill figures. Returns a log part.
        """
        runs = await asyncio.gather(*(self.server.complete(p, n) for p in prompts))
        wall = max(r.t_last for r in runs) - min(r.t0 for r in runs)
        acc["aggregate_tps"].append(sum(r.tokens for r in runs) / wall)
        acc["ttft_ms"].extend(r.ttft_s * 1000 for r in runs)
        acc["short"].append(sum(1 for r in runs if r.finish != "length"))
        bb = await asyncio.to_thread(
            batched_bench, self.directory / "llama-batched-bench", self.model, threads=self.shape.threads,
            n_ctx_per_seq=self.shape.n_ctx_per_seq, n_batch=self.shape.n_batch, prompt_tokens=prompt_tokens,
            tokens=n, sequences=len(prompts), gpu_layers=self.shape.gpu_layers)
        acc["bb_decode_tps"].append(bb["decode_tps"])
        acc["bb_prefill_s"].append(bb["prefill_s"])
        acc["bb_total_tps"].append(bb["total_tps"])
        acc["bb_command"] = [bb["command"]]
        return (f"llama-server {acc['aggregate_tps'][-1]:.1f} tok/s aggregate | llama-batched-bench decode "
                f"{bb['decode_tps']:.1f} tok/s")

    @staticmethod
    def batch_results(acc: dict[str, list[Any]], bus_agg: Sequence[float], bus_ttft_ms: Sequence[float]
                      ) -> dict[str, Any]:
        """The results.json keys of the batched comparison."""
        from bench.stats import median, percentile, ratio

        agg, ttft = median(acc["aggregate_tps"]), acc["ttft_ms"]
        p95 = percentile(ttft, 95)
        width = len(ttft) // max(1, len(acc["aggregate_tps"]))
        return {
            "llama_server_8_streams_tps": agg,
            "batched8_over_llama_server": ratio(median(bus_agg), agg),
            "ttft_p95_8_topics_over_llama_server": ratio(percentile(bus_ttft_ms, 95), p95),
            "batched_bench_8_decode_tps": median(acc["bb_decode_tps"]),
            "batched8_over_batched_bench_decode": ratio(median(bus_agg), median(acc["bb_decode_tps"])),
            "llama_server_batch": {
                "streams": width, "aggregate_tps": agg, "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": p95,
                "requests": len(ttft), "stopped_before_max_tokens": sum(acc["short"]),
                "samples": acc["aggregate_tps"],
            },
            "batched_bench": {
                "sequences": width, "decode_tps": median(acc["bb_decode_tps"]),
                "prefill_s": median(acc["bb_prefill_s"]), "total_tps": median(acc["bb_total_tps"]),
                "samples": acc["bb_decode_tps"], "command": (acc.get("bb_command") or [""])[0],
            },
        }
