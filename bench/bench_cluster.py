"""What running several nodes costs, and how fast a dead node's topics move (issue 11).

    .venv/bin/python -m bench.bench_cluster              # writes bench/cluster.json
    .venv/bin/python -m bench.bench_cluster --quick      # a smoke run

On a 3-server nats-server cluster (routes on loopback; bench/nats_cluster.py), three ``lamabus serve`` processes:

* ``solo``: one node, the default single-node service (SQLite registry), prefix ``solo``;
* ``a`` and ``b``: two nodes of one service (``--registry nats``, prefix ``lama``), on servers 1 and 2.

Two figures:

* **One stream through 2 nodes / 1 node.** The same prompt, ``--tokens`` tokens, greedy, in a fresh topic
  each time, streamed by ``solo`` and by the pair (a topic node ``a`` owns), one stream at a time,
  alternating. Stream tok/s is what the client sees: completion tokens over the time from the first token
  to ``generation.completed``; the ratio is the medians' (target >= 0.95: coordination costs <= 5 %).
* **Death to first token elsewhere.** A long reply streams from node ``a``; ``a`` is SIGKILLed after its
  first token; the time from the kill to the first token (``seq`` 0) of the same message's reply, now from
  node ``b``. ``a`` is started again between runs. Also the time to ``b`` holding ``a``'s partitions (its
  log). Medians of ``--kills`` runs.

Run it on a quiet machine; the load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nats  # noqa: E402

from bench.serve_process import ServeProcess  # noqa: E402
from bus.node.cluster import bucket_name, partition_of, wanted_owner  # noqa: E402
from bus.config import Settings  # noqa: E402
from bus.node.publisher import MSG_ID  # noqa: E402
from bus.subjects import Subjects  # noqa: E402
from bench.nats_cluster import NatsCluster  # noqa: E402  (the one loopback cluster harness; the tests use it too)
from wire.messages import (  # noqa: E402
    ChatMessage,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    GenerationToken,
    decode_topic_event,
    encode,
)
from wire.params import GenerationParams  # noqa: E402

RESULTS = ROOT / "bench" / "cluster.json"
PAIR, SOLO = Subjects("lama"), Subjects("solo")
PARTITIONS = Settings().partitions
PROMPT = "Count from 1 to 500, separated by commas."


def _config(path: Path, **values: object) -> Path:
    lines = ["[lamabus]", 'web = "off"', 'metrics = "off"', 'log_level = "info"',
             *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def _topic_of(node: str, nodes: set[str], tag: str) -> str:
    """A fresh topic id whose partition ``node`` owns among ``nodes``."""
    while True:
        topic = f"{tag}-{uuid.uuid4().hex[:8]}"
        if wanted_owner(partition_of(topic, PARTITIONS), nodes) == node:
            return topic


async def _owned_by(nc: nats.NATS, nodes: set[str], timeout: float = 90.0) -> None:
    kv = await nc.jetstream().key_value(bucket_name(PAIR))
    deadline = time.monotonic() + timeout
    while True:
        held = {}
        for p in range(PARTITIONS):
            with contextlib.suppress(Exception):
                held[p] = (await kv.get(f"part.{p}")).value.decode()
        if all(held.get(p) == wanted_owner(p, nodes) for p in range(PARTITIONS)):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"partitions not settled on {sorted(nodes)}: {held}")
        await asyncio.sleep(0.2)  # polling the leases, with a deadline


class _Watch:
    """A topic's tokens and events as they arrive, stamped with the monotonic clock."""

    def __init__(self, nc: nats.NATS, subjects: Subjects, topic: str) -> None:
        self.nc, self.subjects, self.topic = nc, subjects, topic
        self.queue: asyncio.Queue[tuple[float, object]] = asyncio.Queue()
        self.subs: list = []

    async def __aenter__(self) -> "_Watch":
        async def on(msg) -> None:
            with contextlib.suppress(Exception):
                self.queue.put_nowait((time.monotonic(), decode_topic_event(msg.data)))
        for subject in (self.subjects.tok(self.topic), self.subjects.evt(self.topic)):
            self.subs.append(await self.nc.subscribe(subject, cb=on))
        await self.nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def next(self, timeout: float) -> tuple[float, object]:
        return await asyncio.wait_for(self.queue.get(), timeout)


async def _post(nc: nats.NATS, subjects: Subjects, message: ChatMessage) -> None:
    await nc.jetstream().publish(subjects.msg(message.topic), encode(message), headers={MSG_ID: message.id})


def _message(topic: str, tokens: int) -> ChatMessage:
    return ChatMessage(id=str(uuid.uuid4()), topic=topic, author_id="bench", text=PROMPT,
                       sent_at=datetime.now(timezone.utc),
                       params=GenerationParams(max_tokens=tokens, temperature=0.0, seed=1, stop=[]))


async def one_stream(nc: nats.NATS, subjects: Subjects, topic: str, tokens: int, timeout: float) -> dict[str, float]:
    message = _message(topic, tokens)
    async with _Watch(nc, subjects, topic) as watch:
        posted = time.monotonic()
        await _post(nc, subjects, message)
        first: float | None = None
        count = 0
        while True:
            at, event = await watch.next(timeout)
            if isinstance(event, GenerationToken) and event.request_id == message.id:
                first = at if first is None else first
                count += 1
            elif isinstance(event, GenerationFailed) and event.request_id == message.id:
                raise RuntimeError(f"the stream failed: {event.error}")
            elif isinstance(event, GenerationCompleted) and event.request_id == message.id:
                assert first is not None
                return {"tokens": event.tokens, "tokensReceived": count, "ttft": first - posted,
                        "streamTokPerS": (event.tokens - 1) / max(1e-9, at - first),
                        "engineTokPerS": event.timing.tokens_per_second, "node": event.node_id or "solo"}


async def one_kill(nc: nats.NATS, a: ServeProcess, b: ServeProcess, tokens: int, timeout: float) -> dict[str, float]:
    topic = _topic_of("a", {"a", "b"}, "kill")
    message = _message(topic, tokens)
    async with _Watch(nc, PAIR, topic) as watch:
        await _post(nc, PAIR, message)
        while True:  # node a's first token: it is generating
            _, event = await watch.next(timeout)
            if isinstance(event, GenerationToken) and event.request_id == message.id:
                break
        seen = len(b.lines)
        await a.kill()
        killed, killed_wall = time.monotonic(), datetime.now()
        while True:  # the first token of the same message's reply again, from b
            at, event = await watch.next(timeout)
            if isinstance(event, GenerationToken) and event.request_id == message.id and event.seq == 0:
                first_elsewhere = at - killed
                break
        while True:
            _, event = await watch.next(timeout)
            if isinstance(event, GenerationStarted) and event.request_id == message.id:
                continue
            if isinstance(event, GenerationCompleted) and event.request_id == message.id:
                answered_by = event.node_id
                break
    took = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") for line in list(b.lines)[seen:]
            if "owns partition" in line]
    leases = (max(took) - killed_wall).total_seconds() if took else None
    return {"killToFirstTokenElsewhere": first_elsewhere, "killToLeasesTaken": leases, "answeredBy": answered_by}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (/proc; its children not included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def idle_cpu(processes: dict[str, int], seconds: float) -> dict[str, float]:
    """Percent of one core each process used while nothing was asked of the services: what being a node
    costs by itself (heartbeats, lease renewals, the membership read, each server's share of them)."""
    before, began = {k: _cpu_seconds(pid) for k, pid in processes.items()}, time.monotonic()
    await asyncio.sleep(seconds)
    took = time.monotonic() - began
    return {k: round(100 * (_cpu_seconds(pid) - before[k]) / took, 2) for k, pid in processes.items()}


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


async def run(args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        base = Path(tmp)
        async with NatsCluster(base / "nats", size=3) as cluster:
            url = lambda i: ",".join(cluster.urls_from(i))  # noqa: E731
            solo = ServeProcess(url(1), base / "solo", _config(base / "solo.toml", prefix="solo"), strict=False)
            a = ServeProcess(url(1), base / "a", _config(base / "a.toml", node_id="a", registry="nats"), strict=False)
            b = ServeProcess(url(2), base / "b", _config(base / "b.toml", node_id="b", registry="nats"), strict=False)
            nc = await nats.connect(servers=cluster.urls_from(3), connect_timeout=2, max_reconnect_attempts=-1,
                                    reconnect_time_wait=0.1)
            try:
                for proc in (solo, a, b):
                    await proc.start(timeout=120)
                await _owned_by(nc, {"a", "b"})
                # Warm: each side loads the model once before anything is timed.
                await one_stream(nc, SOLO, f"warm-{uuid.uuid4().hex[:6]}", 8, args.timeout)
                await one_stream(nc, PAIR, _topic_of("a", {"a", "b"}, "warm"), 8, args.timeout)
                idle = await idle_cpu({"solo": solo.pid, "a": a.pid, "b": b.pid,
                                       **{f"nats{n.index}": n.proc.pid for n in cluster.nodes if n.proc}},
                                      args.idle_seconds)
                print(f"  idle cpu (% of one core): {idle}", flush=True)
                streams: dict[str, list[dict]] = {"solo": [], "pair": []}
                for i in range(args.reps):
                    order = [("solo", SOLO, None), ("pair", PAIR, "a")]
                    for side, subjects, owner in (order if i % 2 == 0 else order[::-1]):
                        topic = (_topic_of(owner, {"a", "b"}, "stream") if owner
                                 else f"stream-{uuid.uuid4().hex[:8]}")
                        streams[side].append(await one_stream(nc, subjects, topic, args.tokens, args.timeout))
                        print(f"  {side}: {streams[side][-1]}", flush=True)
                kills: list[dict] = []
                for _ in range(args.kills):
                    kills.append(await one_kill(nc, a, b, args.kill_tokens, args.timeout))
                    print(f"  kill: {kills[-1]}", flush=True)
                    await a.start(timeout=120)
                    await _owned_by(nc, {"a", "b"})
                    # a loads its model again before the next kill's reply; that load is not failover.
                    await one_stream(nc, PAIR, _topic_of("a", {"a", "b"}, "rewarm"), 4, args.timeout)
            finally:
                await nc.close()
                for proc in (solo, a, b):
                    await proc.stop()
    solo_rate, pair_rate = _median(streams["solo"], "streamTokPerS"), _median(streams["pair"], "streamTokPerS")
    # Each rep's pair of streams ran back to back: their ratio sees the same moment of the machine's load.
    paired = [p["streamTokPerS"] / s["streamTokPerS"] for p, s in zip(streams["pair"], streams["solo"])]
    return {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.bench_cluster " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadAverageBefore": [round(x, 2) for x in load_before],
                    "loadAverageAfter": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"tokens": args.tokens, "reps": args.reps, "kills": args.kills, "killTokens": args.kill_tokens,
                     "ackWait": Settings().ack_wait, "leaseTtl": Settings().lease_ttl, "partitions": PARTITIONS,
                     "natsServers": 3},
        "oneStream": {
            "soloTokPerS": solo_rate, "pairTokPerS": pair_rate,
            "pairOverSolo": pair_rate / solo_rate if solo_rate and pair_rate else None,
            "pairedRatios": paired, "pairedRatioMedian": statistics.median(paired) if paired else None,
            "soloTtft": _median(streams["solo"], "ttft"), "pairTtft": _median(streams["pair"], "ttft"),
            "soloEngineTokPerS": _median(streams["solo"], "engineTokPerS"),
            "pairEngineTokPerS": _median(streams["pair"], "engineTokPerS"),
            "target": ">= 0.95", "runs": streams,
        },
        "idleCpu": {"seconds": args.idle_seconds, "percentOfOneCore": idle,
                    "note": "service processes only (not their engine workers); the 3 nats servers serve both "
                            "services at once"},
        "failover": {
            "killToFirstTokenElsewhere": _median(kills, "killToFirstTokenElsewhere"),
            "killToLeasesTaken": _median(kills, "killToLeasesTaken"),
            "runs": kills,
        },
    }


def markdown(results: dict) -> str:
    """The section docs/benchmarks.md shows (bench/report.py renders it when bench/cluster.json exists)."""
    one, fail, m = results["oneStream"], results["failover"], results["machine"]
    cfg = results["settings"]

    def n(x: float | None, spec: str = ".2f") -> str:
        return "n/a" if x is None else format(x, spec)

    def spread(side: str) -> str:
        rates = [r["streamTokPerS"] for r in one["runs"][side]]
        return f"{min(rates):.1f}-{max(rates):.1f}" if rates else "n/a"

    kills = ", ".join(n(r["killToFirstTokenElsewhere"]) for r in fail["runs"])
    leases = ", ".join(n(r["killToLeasesTaken"]) for r in fail["runs"])
    return (
        "## 6. Several nodes (issue 11)\n\n"
        f"From `{results['command'].strip()}` ({results['when']}), written to `bench/cluster.json`. It ran on "
        f"a 3-server nats-server cluster on loopback, with default `ack_wait` {cfg['ackWait']:g} s, `lease_ttl` "
        f"{cfg['leaseTtl']:g} s and {cfg['partitions']} partitions. Load average {m['loadAverageBefore']} before "
        f"and {m['loadAverageAfter']} after, on {m['cpus']} CPUs.\n\n"
        f"- **One stream, 2 nodes / 1 node: {n(one['pairOverSolo'], '.3f')}** (target {one['target']}). The "
        f"figure is the median stream tok/s of {cfg['reps']} streams of up to {cfg['tokens']} tokens each, alternating: "
        f"{n(one['pairTokPerS'], '.1f')} tok/s from a node of a 2-node service (`--registry nats`, R3 streams) "
        f"against {n(one['soloTokPerS'], '.1f')} tok/s from the single-node default (SQLite registry). Time to "
        f"first token, medians: {n(one['pairTtft'])} s against {n(one['soloTtft'])} s. Each rep's two streams "
        f"ran back to back; their ratios were {', '.join(n(x) for x in one.get('pairedRatios') or [])}, with "
        f"median {n(one.get('pairedRatioMedian'), '.3f')}. Single streams ranged "
        f"{spread('pair')} tok/s (pair) and {spread('solo')} tok/s (solo). On a loaded machine that spread "
        "says more than the ratio does. The engine's own tok/s equals the client's, so the bus adds no "
        "measurable cost to either side.\n"
        f"- **SIGKILL of a node mid-reply, to the first token of that reply on the other node: "
        f"{n(fail['killToFirstTokenElsewhere'])} s** (median of {len(fail['runs'])}: {kills} s). From the kill "
        f"to the other node holding the dead node's partitions: {leases} s.\n"
        + _idle_line(results.get("idleCpu"))
    )


def _idle_line(idle: dict | None) -> str:
    if not idle:
        return ""
    cpu = idle["percentOfOneCore"]
    nats_total = sum(v for k, v in cpu.items() if k.startswith("nats"))
    return (f"- **Idle, what being a node costs:** over {idle['seconds']:g} s with nothing asked, node a "
            f"{cpu.get('a')} % and node b {cpu.get('b')} % of one core, against {cpu.get('solo')} % for the single "
            f"node (service processes, not engine workers). The 3 nats servers, which serve both services, used "
            f"{nats_total:.1f} % together.\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench_cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="streams per side (default 5)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per timed stream (default 128)")
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs of node a (default 3)")
    p.add_argument("--kill-tokens", type=int, default=200, help="max tokens of the reply that is interrupted")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for any one event")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="the idle window of the CPU figure")
    p.add_argument("--quick", action="store_true", help="1 rep, 16 tokens, 1 kill (a smoke run)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"where the JSON goes (default {RESULTS})")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.tokens, args.kills, args.kill_tokens, args.idle_seconds = 1, 16, 1, 64, 2.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    one, fail = results["oneStream"], results["failover"]
    print(f"one stream: solo {one['soloTokPerS']:.1f} tok/s, pair {one['pairTokPerS']:.1f} tok/s, "
          f"pair/solo {one['pairOverSolo']:.3f} (target >= 0.95); back-to-back pairs' median ratio "
          f"{one['pairedRatioMedian']:.3f}")
    print(f"failover: kill -> first token on the other node {fail['killToFirstTokenElsewhere']:.2f} s (median), "
          f"kill -> leases taken {fail['killToLeasesTaken']}")
    print(f"load average before {results['machine']['loadAverageBefore']}, after "
          f"{results['machine']['loadAverageAfter']}; written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
