"""The soak: hostile payloads, kills, broker restarts and a burst against a real ``lamabus serve`` (issue 16).

    .venv/bin/python -m bench.soak                 # full run, about 25 minutes on 2 cores
    .venv/bin/python -m bench.soak --quick         # smoke run (a few minutes)
    .venv/bin/python -m bench.soak --parts hostile,burst --json /tmp/soak.json

Everything runs on loopback: each part starts its own nats-server (bus.broker.embedded, a free port,
its own store) and ``lamabus serve --nats-url`` as a subprocess with its own data directory,
and every wait has a deadline. A part that reaches its time bound stops and reports how far it
got (``reached`` of ``planned``, ``bounded: true``). The parts:

1. ``hostile``: bench/hostile.py's topic, cancel and API payloads, shuffled, over a raw NATS
   connection, the first share one at a time (each flushed, a request's reply awaited) and the
   rest in batches. Meanwhile ``$SRV.PING.lamabus`` every second: a ping unanswered in 2 s is a
   deaf second, consecutive ones a deaf period. The serve process is watched: an exit is a
   crash (it is restarted). Each payload must get its structured answer: a ``message.rejected``
   (on ``<prefix>.topic.*.evt`` or ``<prefix>.rejected``), a completion (or a failure or a
   cancellation) for the valid ones, a reply for each request, or, for an AI author, deliberately
   nothing (the service's ``ignored_ai`` counter). Whatever got none is a silent drop.
2. ``kill``: a long generation is posted, at its first token ``serve`` is SIGKILLed and started
   again; the stream must then hold exactly one AI reply ``chat.message`` and one
   ``generation.completed`` per message (lost: none, duplicated: more). Kill -> completed is timed.
3. ``broker``: the same with the nats-server stopped (SIGKILL and SIGTERM alternately) and started
   on the same port and store while the reply streams.
4. ``burst``: messages over many topics posted at once (maxTokens 1, temperature 0, the service
   with ``history_cache_turns = 2``): answered, lost, duplicated (in the stream), per-topic order
   violations, refused (``busy``), messages/s.

Each part has its module (bench/soak_hostile.py, bench/soak_faults.py for ``kill`` and
``broker``, bench/soak_burst.py), their common world (``Rig``: broker, serve, observer) is
bench/soak_rig.py, and the serve process bench/serve_process.py (shared with the fault tests).

The figures go to bench/soak.json (``--json``) and a table is printed. The goal of every crash,
deaf, drop, loss, duplicate, order and refusal figure is 0; ``zero_goal`` lists them with where
they stand.
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

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.soak_burst import part_burst  # noqa: E402
from bench.soak_faults import part_broker, part_kill  # noqa: E402
from bench.soak_hostile import part_hostile  # noqa: E402
from bench.soak_rig import Rig, now_iso  # noqa: E402

FULL = {"payloads": 10_000, "one_at_a_time": 2_000, "batch": 100, "kills": 20, "broker_restarts": 10,
        "burst": 1_000, "burst_topics": 50, "long_tokens": 24,
        "bounds": {"hostile": 420.0, "kill": 420.0, "broker": 240.0, "burst": 360.0}}
QUICK = {"payloads": 300, "one_at_a_time": 60, "batch": 40, "kills": 2, "broker_restarts": 2,
         "burst": 100, "burst_topics": 10, "long_tokens": 24,
         "bounds": {"hostile": 180.0, "kill": 150.0, "broker": 120.0, "burst": 150.0}}
PARTS = ("hostile", "kill", "broker", "burst")


# -- the run -------------------------------------------------------------------------------------

RUNNERS = {"hostile": part_hostile, "kill": part_kill, "broker": part_broker, "burst": part_burst}
#: Figures whose goal is 0, per part.
ZERO = {"hostile": ("crashes", "deaf_periods", "silent_drops", "internal_errors", "extra_rejections"),
        "kill": ("lost", "duplicated", "crashes"),
        "broker": ("lost", "duplicated", "crashes"),
        "burst": ("lost", "duplicated", "order_violations", "refused_busy", "crashes")}


async def run(parts: list[str], cfg: dict, work: Path) -> dict:
    results: dict[str, Any] = {}
    for name in parts:
        bound = cfg["bounds"][name]
        print(f"[soak] {name}: bound {bound:.0f} s ...", file=sys.stderr, flush=True)
        load_before = os.getloadavg()[0]
        try:
            async with Rig(work, name) as rig:
                async with asyncio.timeout(bound + 240):  # the part's own bound, plus its final checks
                    results[name] = await RUNNERS[name](rig, cfg, bound)
                results[name]["serve_log_errors"] = rig.serve.errors if rig.serve else None
        except Exception as exc:  # a part that breaks says so; the others still run
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["date"] = now_iso()
        # The machine's load (1-minute average) around the part: llama.cpp's decode threads stall
        # when others take the cores, so times and rates only compare at similar load.
        results[name]["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        print(f"[soak] {name}: {json.dumps(results[name], default=str)[:600]}", file=sys.stderr, flush=True)
    return results


def zero_goal(results: dict) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for part, names in ZERO.items():
        if part in results:
            for name in names:
                out[f"{part}.{name}"] = results[part].get(name)
    return out


def table(doc: dict) -> str:
    rows: list[tuple[str, str, str]] = []
    parts = doc["parts"]

    def add(part: str, label: str, key: str, goal: str = "") -> None:
        if part in parts:
            rows.append((label, str(parts[part].get(key, parts[part].get("error", "-"))), goal))

    h = parts.get("hostile", {})
    if "hostile" in parts:
        rows.append(("hostile payloads published", f"{h.get('reached')} of {h.get('planned')}", ""))
    add("hostile", "  crashes (serve exits)", "crashes", "0")
    add("hostile", "  deaf periods (PING unanswered 2 s)", "deaf_periods", "0")
    add("hostile", "  silent drops", "silent_drops", "0")
    add("hostile", "  structured answers", "structured_answers")
    add("hostile", "  deliberately ignored (AI author)", "deliberately_ignored")
    add("hostile", "  internal errors", "internal_errors", "0")
    k = parts.get("kill", {})
    if "kill" in parts:
        rows.append(("serve SIGKILLed mid-generation", f"{k.get('reached')} of {k.get('planned')}", ""))
    add("kill", "  lost", "lost", "0")
    add("kill", "  duplicated", "duplicated", "0")
    add("kill", "  kill -> completed p50 (s)", "kill_to_completed_p50_s")
    add("kill", "  kill -> completed max (s)", "kill_to_completed_max_s")
    add("kill", "  kill -> accepted again p50 (s)", "kill_to_accepted_again_p50_s")
    add("kill", "  answer's own generation p50 (s)", "answer_elapsed_p50_s")
    b = parts.get("broker", {})
    if "broker" in parts:
        rows.append(("broker restarted mid-stream", f"{b.get('reached')} of {b.get('planned')}", ""))
    add("broker", "  lost", "lost", "0")
    add("broker", "  duplicated", "duplicated", "0")
    add("broker", "  serve exits", "crashes", "0")
    u = parts.get("burst", {})
    if "burst" in parts:
        rows.append((f"burst over {u.get('topics')} topics", f"{u.get('planned')} posted", ""))
    add("burst", "  answered", "answered")
    add("burst", "  lost", "lost", "0")
    add("burst", "  duplicated", "duplicated", "0")
    add("burst", "  per-topic order violations", "order_violations", "0")
    add("burst", "  refused (busy)", "refused_busy", "0")
    add("burst", "  messages/s", "messages_per_s")
    width = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"{'figure':<{width}}  {'value':>12}  goal", "-" * (width + 20)]
    lines += [f"{label:<{width}}  {value:>12}  {goal}" for label, value, goal in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts and bounds: a smoke run")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--payloads", type=int, help="hostile payloads (full 10000)")
    ap.add_argument("--kills", type=int, help="serve SIGKILLs (full 20)")
    ap.add_argument("--broker-restarts", type=int, help="broker restarts (full 10)")
    ap.add_argument("--burst", type=int, help="burst messages (full 1000)")
    ap.add_argument("--burst-topics", type=int, help="burst topics (full 50)")
    ap.add_argument("--bound-scale", type=float, default=1.0,
                    help="multiply every part's time bound (a slow or busy machine)")
    ap.add_argument("--update", action="store_true",
                    help="keep the other parts already in the --json file (each part says its own date and command)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "soak.json"), help="where the figures go")
    ap.add_argument("--workdir", help="where the brokers' stores and data directories go (a temporary dir)")
    args = ap.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = json.loads(json.dumps(QUICK if args.quick else FULL))
    for key in ("payloads", "kills", "broker_restarts", "burst", "burst_topics"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg["bounds"] = {k: v * args.bound_scale for k, v in cfg["bounds"].items()}
    cfg["one_at_a_time"] = min(cfg["one_at_a_time"], cfg["payloads"] // 5)
    parts = [p for p in PARTS if p in args.parts.split(",")]
    work = Path(tempfile.mkdtemp(prefix="lamabus-soak-", dir=args.workdir))
    started = time.monotonic()
    try:
        results = asyncio.run(run(parts, cfg, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    for part in results.values():
        part["command"] = command
    if args.update and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        kept = {name: {"command": old.get("command"), "date": old.get("date"), **part}
                for name, part in old.get("parts", {}).items() if name not in results}
        results = {name: (results[name] if name in results else kept[name])
                   for name in PARTS if name in results or name in kept}
    doc = {
        "command": command,
        "date": now_iso(), "quick": args.quick, "config": cfg, "seconds": round(time.monotonic() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "parts": results,
    }
    doc["zero_goal"] = zero_goal(results)
    doc["all_zero"] = all(v == 0 for v in doc["zero_goal"].values()) and not any("error" in r for r in results.values())
    Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(table(doc))
    print(f"\nall figures that should be 0 are 0: {doc['all_zero']}  ({args.json}, {doc['seconds']:.0f} s)")
    return 0 if doc["all_zero"] else 1


if __name__ == "__main__":
    sys.exit(main())
