"""What a JSON schema costs the token loop: tok/s with a schema / without (issue 13, target >= 0.8).

    .venv/bin/python -m bench.bench_grammar [--streams 1 4] [--tokens 64] [--reps 5] [--threads N] [--passive] [--json FILE]

The engine samples freely and asks the grammar about the one token it picked; only a
rejected token pays for the grammar over the whole vocabulary (llama.cpp's fast path,
engine/worker.py ``constrain``). How often that happens depends on how well the model
follows the format, so the prompt asks for what the schema wants, as a user would.

Each rep runs, interleaved, the same prompts with and without the schema: ``streams``
concurrent generations on one handle (one batch), temperature 0.7, a seed per stream,
no stop sequences, end-of-generation ignored on the free side. The schema (an array of
eight short strings) is longer than ``--tokens``, so both sides decode about as many
tokens. Rate = tokens after the first / time after the first token, summed over the
streams (the aggregate decode rate); the ratio is the median over reps of schema / free
within a rep (the sides alternate going first). On a machine others load, wall rates
swing; the worker's CPU seconds per token (free / schema) are the steadier figure there
(with --threads 1 --passive, so that no thread spins while it waits for a core).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_engine import bundled_model  # noqa: E402
from engine.runtime import Engine  # noqa: E402
from engine.types import ChatTurn, GenerateRequest, GenerationResult, ModelConfig  # noqa: E402
from wire.params import DEFAULTS, GenerationParams, SamplingParams  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "topic": {"type": "string", "maxLength": 20},
        "facts": {"type": "array", "items": {"type": "string", "maxLength": 60}, "minItems": 8, "maxItems": 8},
    },
    "required": ["topic", "facts"],
    "additionalProperties": False,
}
TOPICS = ["the sea", "mountains", "deserts", "forests", "rivers", "the moon", "volcanoes", "glaciers"]


def request(rid: str, topic: str, seed: int, tokens: int, schema: bool) -> GenerateRequest:
    params = GenerationParams(max_tokens=tokens, temperature=0.7, seed=seed, stop=[],
                              json_schema=SCHEMA if schema else None)
    question = f'List eight short facts about {topic} as JSON: {{"topic": ..., "facts": [...]}}.'
    # A session line first: no side reuses the other's prompt cache, both evaluate the same amount.
    turns = (ChatTurn("system", f"Session {rid}."), ChatTurn("user", question))
    return GenerateRequest(rid, SamplingParams.resolve(params), messages=turns, ignore_eos=not schema)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the worker: what a token costs, whatever else the machine runs."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_side(engine: Engine, handle: str, rep: int, streams: int, tokens: int, schema: bool) -> dict:
    tag = "schema" if schema else "free"
    pid = engine.diagnostics()["models"][0]["worker"]["pid"]
    cpu0 = cpu_seconds(pid)
    results: list[GenerationResult] = await asyncio.gather(*(
        engine.generate(handle, request(f"{tag}-{rep}-{i}", TOPICS[i % len(TOPICS)], 1000 * rep + i, tokens, schema))
        for i in range(streams)
    ))
    cpu = cpu_seconds(pid) - cpu0
    rate = sum(r.timing.tokens_per_second for r in results)
    valid = 0
    if schema:
        for r in results:
            try:
                json.loads(r.text)
                valid += 1
            except ValueError:
                pass  # cut off by --tokens: expected, the schema is longer on purpose
    n = sum(r.tokens for r in results)
    return {"rate": rate, "tokens": n, "cpu_per_token": cpu / n, "complete_json": valid}


async def main_async(args: argparse.Namespace) -> dict:
    report: dict = {"tokens": args.tokens, "reps": args.reps, "by_streams": {}}
    env = {"OMP_WAIT_POLICY": "PASSIVE"} if args.passive else {}
    async with Engine(worker_env=env) as engine:
        handle = await engine.initialize(ModelConfig(bundled_model(), n_ctx=512, n_seq_max=max(args.streams),
                                                     n_threads=args.threads))
        await run_side(engine, handle, 99, 1, 8, True)  # warm-up: load, first grammar, caches
        for streams in args.streams:
            free, constrained = [], []
            for rep in range(args.reps):
                # Alternate which side goes first, and compare within a pair: the load on a shared
                # machine drifts between pairs more than within one.
                first_schema = rep % 2 == 1
                a = await run_side(engine, handle, rep, streams, args.tokens, first_schema)
                b = await run_side(engine, handle, rep, streams, args.tokens, not first_schema)
                c, f = (a, b) if first_schema else (b, a)
                free.append(f)
                constrained.append(c)
            ratios = [c["rate"] / f["rate"] for c, f in zip(constrained, free)]
            cpu_ratio = statistics.median(f["cpu_per_token"] / c["cpu_per_token"] for c, f in zip(constrained, free))
            f = statistics.median(x["rate"] for x in free)
            c = statistics.median(x["rate"] for x in constrained)
            ratio = statistics.median(ratios)
            report["by_streams"][streams] = {
                "free_tok_s": round(f, 1),
                "schema_tok_s": round(c, 1),
                "ratio": round(ratio, 3),
                "cpu_ratio": round(cpu_ratio, 3),
                "pair_ratios": [round(r, 3) for r in ratios],
                "schema_tokens": [x["tokens"] for x in constrained],
                "complete_json": [x["complete_json"] for x in constrained],
            }
            print(f"{streams} stream(s): free {f:6.1f} tok/s   schema {c:6.1f} tok/s   schema/free {ratio:.3f}"
                  f" (pairs {', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.8);"
                  f" by worker CPU per token {cpu_ratio:.3f}", flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=DEFAULTS.n_threads)
    ap.add_argument("--passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for the worker: on a busy machine spinning threads measure the load")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here too")
    args = ap.parse_args()
    report = asyncio.run(main_async(args))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
