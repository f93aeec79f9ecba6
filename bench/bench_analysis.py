"""What a background topic analysis costs a user: TTFT while an analysis runs ÷ idle TTFT (issue 13 part 2).

    .venv/bin/python -m bench.bench_analysis [--reps 8] [--json bench/analysis.json]

One lamabus service in this process (embedded broker, the bundled model, ``analysis_every``
1, so every reply makes its topic due for an analysis), a client on the same broker. Each
repetition asks two fresh topics the same short greedy question (a new nonce each time, so
neither finds the other's prompt cached beyond the system prompt):

* ``idle``: asked while nothing runs: no reply, no analysis (the analyser reports idle);
* ``busy``: the idle topic's reply has made it due, and its analysis starts once the model
  is idle; the question is posted as soon as that analysis has produced its first token,
  so the engine is generating it when the message arrives. The analysis gives way (it is
  cancelled when the message is accepted) and runs again afterwards.

TTFT is the client's: from posting to the first token message, so it includes everything a
user waits for (acceptance, the cancel of the analysis, the engine's queue, prompt
evaluation). The figure is median(busy) ÷ median(idle), with the median of each repetition's
busy ÷ idle beside it (the engine's prompt cache warms over the first repetitions, which are
run first and not counted: ``--warmup``); a repetition whose analysis had
already finished when the question was posted is not counted as busy (reported). The
analyser's outcome counters are reported too: every busy repetition should add one
``preempted``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from bus.node.app import LamabusService  # noqa: E402
from bus.client import LamabusClient  # noqa: E402
from bus.config import Settings  # noqa: E402
from wire.messages import GenerationCompleted, GenerationToken  # noqa: E402
from wire.params import GenerationParams  # noqa: E402

DEFAULT_JSON = ROOT / "bench" / "analysis.json"
QUESTION = "In one sentence, why is the sky blue? ({nonce})"


async def _ttft(client: LamabusClient, topic: str, text: str, max_tokens: int) -> float:
    params = GenerationParams(temperature=0.0, seed=1, max_tokens=max_tokens)
    t0 = time.perf_counter()
    first: float | None = None
    async for item in client.ask(topic, text, params=params, timeout=300):
        if first is None and isinstance(item, GenerationToken):
            first = time.perf_counter() - t0
        if isinstance(item, GenerationCompleted) and first is None:
            first = time.perf_counter() - t0  # a reply with no token message (empty): its end is its first
    assert first is not None
    return first


async def _settle(service: LamabusService, timeout: float = 300.0) -> None:
    analyser = service.analyser
    assert analyser is not None
    with anyio.fail_after(timeout):
        await analyser.idle.wait()


async def run(reps: int = 8, max_tokens: int = 8, workdir: str | None = None, log: Any = print,
              warmup: int = 2) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="lamabus-bench-analysis-", dir=workdir))
    settings = Settings(data_dir=str(work), embedded_port=0, embedded_ws_port=0, web="off", metrics="bus",
                        analysis=True, analysis_every=1)
    idle: list[float] = []
    busy: list[float] = []
    paired: list[float] = []
    missed = 0
    try:
        async with LamabusService(settings) as service:
            analyser = service.analyser
            assert analyser is not None and service.url is not None
            # The embedded broker has users: log in as its admin from the data dir, as the CLI does.
            async with LamabusClient.for_settings(settings) as client:
                await _ttft(client, "warmup", QUESTION.format(nonce="warm"), max_tokens)  # loads the model
                await _settle(service)
                for rep in range(-warmup, reps):  # the first ones fill the engine's prompt cache: not counted
                    nonce = uuid.uuid4().hex[:8]
                    await _settle(service)
                    started = analyser.started  # the next analysis to start sets it: the idle topic's
                    t_idle = await _ttft(client, f"idle-{rep}", QUESTION.format(nonce=f"i{nonce}"), max_tokens)
                    # The idle topic's reply made it due: its analysis starts now that the model is free.
                    with anyio.fail_after(120):
                        await started.wait()
                    running = bool(analyser.running())
                    preempted_before = analyser.counters["preempted"]
                    t_busy = await _ttft(client, f"busy-{rep}", QUESTION.format(nonce=f"b{nonce}"), max_tokens)
                    preempted = analyser.counters["preempted"] > preempted_before
                    await _settle(service)
                    counted = running and preempted
                    if rep >= 0:
                        idle.append(t_idle)
                        if counted:
                            busy.append(t_busy)
                            paired.append(t_busy / t_idle)
                        else:
                            missed += 1
                    log(f"  {'rep' if rep >= 0 else 'warmup'} {rep}: idle {t_idle * 1000:.0f} ms"
                        f" | busy {t_busy * 1000:.0f} ms"
                        f"{'' if running and preempted else ' (analysis not running then: not counted)'}")
                counters = dict(analyser.counters)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(busy) / statistics.median(idle) if busy and idle else None
    return {
        "analysis_ttft_ratio": round(ratio, 3) if ratio is not None else None,
        "idle_ttft_ms_median": round(statistics.median(idle) * 1000, 1) if idle else None,
        "busy_ttft_ms_median": round(statistics.median(busy) * 1000, 1) if busy else None,
        "idle_ttft_ms": [round(t * 1000, 1) for t in idle],
        "busy_ttft_ms": [round(t * 1000, 1) for t in busy],
        "paired_ratio_median": round(statistics.median(paired), 3) if paired else None,
        "busy_not_counted": missed,
        "analyses": counters,
        "reps": reps, "warmup": warmup, "max_tokens": max_tokens,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_analysis", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens of each measured reply")
    ap.add_argument("--warmup", type=int, default=2, help="repetitions first, not counted")
    ap.add_argument("--workdir")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="where the results go (default %(default)s)")
    args = ap.parse_args(argv)
    results = asyncio.run(run(args.reps, args.max_tokens, args.workdir, log=lambda s: print(s, flush=True),
                              warmup=args.warmup))
    print(json.dumps(results, indent=2))
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
