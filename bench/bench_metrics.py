"""What recording metrics costs the token loop: bus tok/s with metrics on ÷ off (issue 13 part 3).

    .venv/bin/python -m bench.bench_metrics [--reps 6] [--tokens 128] [--json FILE]

Two ``lamabus serve`` processes on one embedded broker, each with its own
prefix and data directory: ``off`` (``LAMABUS_METRICS=off``: no recorder, the
plain publisher) and ``on`` (``LAMABUS_METRICS=127.0.0.1:0``: the metered
publisher, and /metrics served). Only one of them generates at a time: every
repetition asks each the same greedy question (a fresh nonce per repetition,
so neither gets a cache hit), the order alternating, and tok/s is the client's
decode rate after the first token exactly as in bench/bench_bus.py. The ``on``
service is scraped after each of its replies (outside the timed part), and the
scrape must show the reply counted. The figure is the median of the
per-repetition ratios on ÷ off; target >= 0.98 (no measurable cost).

On a busy machine that ratio is mostly noise, so the recorder's own cost is
also measured in this process, where nothing else moves it: nanoseconds per
token through :class:`~handlers.metrics.MeteredPublisher` minus the same call
on the bare publisher, and the ratio that cost alone bounds at the measured
``off`` rate, ``1 / (1 + cost × tok/s)``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nats  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.sides import BusSide, ServiceProcess, wait_ready  # noqa: E402
from bench.workload import essay, greedy  # noqa: E402
from bus.broker.embedded import EmbeddedNatsServer  # noqa: E402
from handlers.metrics import ServiceMetrics  # noqa: E402
from wire.messages import GenerationStarted, GenerationToken  # noqa: E402

TARGET = 0.98


def _start(broker_url: str, work: Path, mode: str, metrics: str) -> ServiceProcess:
    service = ServiceProcess(broker_url, work / mode, work / f"{mode}.log")
    saved = {k: os.environ.get(k) for k in ("LAMABUS_PREFIX", "LAMABUS_METRICS", "LAMABUS_WEB")}
    os.environ.update(LAMABUS_PREFIX=mode, LAMABUS_METRICS=metrics, LAMABUS_WEB="off")
    try:
        service.start()  # the child takes a copy of this environment
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return service


def _completed(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "lamabus_requests_total" and s.labels.get("outcome") == "completed")


class _NullPublisher:
    async def token(self, token: Any) -> None:
        pass

    async def event(self, event: Any, *, dedup_id: str, wait: bool = True) -> None:
        pass

    async def message(self, message: Any) -> None:
        pass


async def recorder_ns_per_token(n: int = 200_000) -> float:
    """Extra nanoseconds a token costs through the metered publisher (best of 5 rounds each)."""
    bare = _NullPublisher()
    metered = ServiceMetrics().publisher(bare)
    await metered.event(GenerationStarted(request_id="r", topic="t", author_id="a", model_id="m"), dedup_id="s")
    tok = GenerationToken(request_id="r", topic="t", author_id="a", seq=0, text="x")

    async def loop(publisher: Any) -> float:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            await publisher.token(tok)
        return (time.perf_counter_ns() - t0) / n

    best_bare = min([await loop(bare) for _ in range(5)])
    best_metered = min([await loop(metered) for _ in range(5)])
    return max(0.0, best_metered - best_bare)


async def run(reps: int = 6, tokens: int = 128, workdir: str | None = None, log: Any = print) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="lamabus-bench-metrics-", dir=workdir))
    services: dict[str, ServiceProcess] = {}
    try:
        async with EmbeddedNatsServer(work / "jetstream") as broker:
            assert broker.url is not None
            services = {"off": _start(broker.url, work, "off", "off"),
                        "on": _start(broker.url, work, "on", "127.0.0.1:0")}
            nc = await nats.connect(broker.url, name="lamabus-bench-metrics")
            try:
                sides = {mode: BusSide(nc, prefix=mode) for mode in services}
                for mode, side in sides.items():
                    await side.start()
                    await wait_ready(side, services[mode])
                    await side.ask("warmup", "Say hello.", greedy(8))  # loads the model
                url = (work / "on" / "metrics.url").read_text().strip()
                tps: dict[str, list[float]] = {"on": [], "off": []}
                ratios: list[float] = []
                for rep in range(reps):
                    user = essay(f"m{rep}-{uuid.uuid4().hex[:8]}")
                    got: dict[str, float | None] = {}
                    for mode in (("on", "off") if rep % 2 else ("off", "on")):
                        counted = _completed(url) if mode == "on" else 0.0
                        r = await sides[mode].ask(f"metrics-{rep}", user, greedy(tokens))
                        got[mode] = r.tps(tokens)
                        if mode == "on" and _completed(url) != counted + 1:
                            raise RuntimeError("the metered service did not count its reply")
                    log(f"  rep {rep}: on {got['on'] or 0:.1f} tok/s | off {got['off'] or 0:.1f} tok/s")
                    if got["on"] and got["off"]:
                        tps["on"].append(got["on"])
                        tps["off"].append(got["off"])
                        ratios.append(got["on"] / got["off"])
            finally:
                for service in services.values():
                    service.stop()
                await nc.close()
    except BaseException:
        for mode, service in services.items():
            log(f"{mode} service log tail:\n{service.log_tail()}")
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(ratios) if ratios else None
    cost_ns = await recorder_ns_per_token()
    off = statistics.median(tps["off"]) if tps["off"] else None
    return {
        "metrics_ns_per_token": round(cost_ns, 1),
        "metrics_cost_bound_ratio": round(1 / (1 + cost_ns * 1e-9 * off), 5) if off else None,
        "metrics_on_tps": round(statistics.median(tps["on"]), 1) if tps["on"] else None,
        "metrics_off_tps": round(statistics.median(tps["off"]), 1) if tps["off"] else None,
        "metrics_on_off_ratio": round(ratio, 3) if ratio is not None else None,
        "metrics_ratios": [round(r, 3) for r in ratios],
        "metrics_target": TARGET,
        "reps": reps, "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_metrics", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--workdir")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    results = asyncio.run(run(args.reps, args.tokens, args.workdir, log=lambda s: print(s, flush=True)))
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
