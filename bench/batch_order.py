"""Why the engine keeps running sequences on consecutive ids, measured.

    .venv/bin/python -m bench.batch_order [--steps 48] [--reps 2]

One raw llama.cpp context with 8 non-unified sequences (the engine's shape); each
line decodes one token per sequence per ``llama_decode`` for the same prompts,
only the order of the sequence ids in the batch (or which ids) differs. llama.cpp
groups sequences into one micro-batch only while their ids rise by one in batch
order (``llama_batch_allocr::split_equal``, sequential), so anything else costs
extra passes over the weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp as ll  # noqa: E402

from bench.baseline import RawLlama  # noqa: E402
from bench.bench_engine import bundled_model, messages  # noqa: E402

LAYOUTS = {
    "ids 0..7, ascending": [0, 1, 2, 3, 4, 5, 6, 7],
    "ids 0..7, shuffled": [3, 0, 5, 1, 7, 2, 6, 4],
    "ids 0..7, descending": [7, 6, 5, 4, 3, 2, 1, 0],
    "ids 0..3, ascending": [0, 1, 2, 3],
    "ids 0,2,4,6 (gaps)": [0, 2, 4, 6],
}


def decode_rate(raw: RawLlama, order: list[int], steps: int) -> float:
    ll.llama_memory_clear(raw.mem, True)
    prompts = {s: raw.tokenize(raw.chat_prompt(messages(f"order-{s}")))[:48] for s in order}
    for s in order:
        raw._fill([(t, i, s, i == len(prompts[s]) - 1) for i, t in enumerate(prompts[s])])
        if ll.llama_decode(raw.ctx, raw.batch) != 0:
            raise RuntimeError("prompt decode failed")
    pos = {s: len(prompts[s]) for s in order}
    t0 = time.perf_counter()
    for step in range(steps):
        raw._fill([(100 + step, pos[s], s, True) for s in order])
        if ll.llama_decode(raw.ctx, raw.batch) != 0:
            raise RuntimeError("decode failed")
        for s in order:
            pos[s] += 1
    return steps * len(order) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    raw = RawLlama(bundled_model(), n_seq_max=8, n_threads=args.threads)
    rates: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    for _ in range(args.reps):
        for label, order in LAYOUTS.items():
            rates[label].append(decode_rate(raw, order, args.steps))
    for label, xs in rates.items():
        print(f"{label:24s} {statistics.median(xs):7.1f} tok/s aggregate  ({', '.join(f'{x:.1f}' for x in xs)})")
    raw.close()


if __name__ == "__main__":
    main()
