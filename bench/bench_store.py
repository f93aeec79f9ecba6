"""Registry store speed: durable appends per second, and rebuilding the projections from 100k events.

    .venv/bin/python -m bench.bench_store [--appends 500] [--events 100000] [--dir DIR] [--json OUT]

* appends: one event per append, each append its own ``BEGIN IMMEDIATE`` ...
  ``COMMIT`` with ``synchronous=FULL`` (an fsync per commit) and an expected
  version check, as a registry command does it. The number is bounded by the
  disk's fsync latency, so run it where the data directory lives (``--dir``).
* rebuild: a log of ``--events`` events shaped like a busy service (a few
  dozen models; topics with user messages, replies and usage records, written
  in large batches so populating is quick), then a fresh store opens the file
  and ``Projections.rebuild`` reads, decodes and folds all of it.

``run()`` returns a dict with ``registry_append_eps`` and ``registry_rebuild_100k_s``
(scaled linearly when ``events`` is not 100k) for the main bench to import.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage.events import (  # noqa: E402
    ModelActivated,
    ModelImported,
    ModelParametersChanged,
    ModelUsed,
    TopicCreated,
    TopicMessageSeen,
    TopicReplyPosted,
)
from storage.projections import Projections  # noqa: E402
from storage.sqlite import SqliteEventStore  # noqa: E402
from storage.store import AppendRequest, NewEvent  # noqa: E402
from wire.messages import Timing, Usage  # noqa: E402
from wire.params import GenerationParams  # noqa: E402

N_MODELS = 40
N_TOPICS = 500
TEXT = "How do I keep a sourdough starter alive while I am away for two weeks?"
ANSWER = "Feed it, refrigerate it, and give it two feedings at room temperature when you are back. " * 3


def _imported(i: int, at: int) -> ModelImported:
    return ModelImported(at=at, name=f"Model {i}", filename=f"model-{i}.Q4_K_M.gguf",
                         model_path=f"/data/models/model-{i}.Q4_K_M.gguf", size=700_000_000 + i,
                         checksum=f"{i:064x}", architecture="llama", parameter_count=1_100_000_000,
                         context_length=2048, quantization="Q4_K_M", provider="local")


async def measure_appends(path: Path, n: int) -> dict[str, float]:
    async with SqliteEventStore(path) as store:
        await store.append("model-bench", [_imported(0, 0)], 0)
        version = 1
        latencies = []
        started = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            result = await store.append("model-bench", [ModelUsed(at=i)], version)
            latencies.append(time.perf_counter() - t0)
            version = result.last_version
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "registry_append_eps": n / elapsed,
        "registry_append_p50_ms": latencies[len(latencies) // 2] * 1000,
        "registry_append_p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


async def populate(path: Path, n_events: int, batch: int = 2000) -> int:
    """Write ``n_events`` events quickly (big transactions); returns how many were written."""
    at = 1_700_000_000_000
    pending: list[AppendRequest] = []
    written = 0

    async with SqliteEventStore(path) as store:
        async def flush() -> None:
            nonlocal pending
            if pending:
                await store.append_batch(pending)
                pending = []

        for i in range(N_MODELS):
            events = [_imported(i, at), ModelParametersChanged(at=at, generation=GenerationParams(temperature=0.5))]
            if i == 0:
                events.append(ModelActivated(at=at))
            pending.append(AppendRequest(f"model-{i}", events))
            written += len(events)
        for t in range(N_TOPICS):
            pending.append(AppendRequest(f"topic-t{t}", [TopicCreated(at=at, name=f"room {t}")]))
            written += 1
        await flush()
        # Per exchange: a seen message and a reply in the topic, a usage record on the model.
        topic_buf: dict[str, list[NewEvent]] = {}
        model_buf: dict[str, list[NewEvent]] = {}
        k = 0
        while written < n_events:
            at += 1
            topic, model = f"t{k % N_TOPICS}", f"model-{k % N_MODELS}"
            mid = f"m{k}"
            topic_buf.setdefault(f"topic-{topic}", []).extend([
                NewEvent(TopicMessageSeen(at=at, message_id=mid, author_id="user-1", text=TEXT,
                                          sent_at="2024-05-01T12:00:00Z"), f"{topic}/{mid}/seen"),
                NewEvent(TopicReplyPosted(at=at, message_id=f"r{k}", reply_to=mid, model_id=model, author_id="ai",
                                          text=ANSWER, sent_at="2024-05-01T12:00:01Z", tokens=60,
                                          finish_reason="stop", usage=Usage(40, 60, 100),
                                          timing=Timing(1.0, 2.0, 1.0, 72.0, 130.0)), f"{topic}/{mid}/reply"),
            ])
            model_buf.setdefault(model, []).append(NewEvent(ModelUsed(at=at), f"{topic}/{mid}/used"))
            written += 3
            k += 1
            if k % (batch // 3) == 0 or written >= n_events:
                pending = [AppendRequest(s, evs) for s, evs in (*topic_buf.items(), *model_buf.items())]
                topic_buf, model_buf = {}, {}
                await flush()
        return await store.last_position()


async def measure_rebuild(path: Path) -> dict[str, float]:
    async with SqliteEventStore(path) as store:
        started = time.perf_counter()
        view = await Projections.rebuild(store)
        elapsed = time.perf_counter() - started
        size = store.file_size()
    assert view.event_count == view.position
    return {"registry_rebuild_s": elapsed, "registry_rebuild_events": view.event_count,
            "registry_rebuild_eps": view.event_count / elapsed, "registry_db_bytes": size}


async def _run(appends: int, events: int, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"dir": str(workdir)}
    out.update(await measure_appends(workdir / "appends.sqlite3", appends))
    written = await populate(workdir / "rebuild.sqlite3", events)
    rebuild = await measure_rebuild(workdir / "rebuild.sqlite3")
    out.update(rebuild)
    out["registry_rebuild_100k_s"] = rebuild["registry_rebuild_s"] * 100_000 / written
    return out


def run(appends: int = 500, events: int = 100_000, workdir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Measure in a fresh temporary directory (under ``workdir`` if given), removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="lamabus-bench-", dir=workdir))
    try:
        return asyncio.run(_run(appends, events, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=500)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--dir", help="where to put the databases (the disk that will hold the data dir)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = run(args.appends, args.events, args.dir)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"registry store ({results['dir']})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(f"durable appends/s ({args.appends}, 1 event, FULL sync)", f"{results['registry_append_eps']:.0f}")
    table.add_row("append latency p50 / p99 (ms)",
                  f"{results['registry_append_p50_ms']:.2f} / {results['registry_append_p99_ms']:.2f}")
    table.add_row(f"rebuild {results['registry_rebuild_events']} events (s)", f"{results['registry_rebuild_s']:.2f}")
    table.add_row("rebuild events/s", f"{results['registry_rebuild_eps']:.0f}")
    table.add_row("rebuild, per 100k events (s)", f"{results['registry_rebuild_100k_s']:.2f}")
    table.add_row("database size (MiB)", f"{results['registry_db_bytes'] / 2**20:.1f}")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
