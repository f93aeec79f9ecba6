"""The bus benchmark's measures (run in this order by bench/bench_bus.py), each returning its typed
figures (bench/bus_results.py):

1. + 2. one stream: every side in turn, the order rotating per repetition: tok/s, TTFT and
   where the bus's TTFT goes, CPU per token;
3. a conversation: TTFT per turn, the bus against llama-cpp-python with and without its
   prefix cache (and llama-server with its own slot);
4. concurrent topics: aggregate tok/s and TTFT percentiles, against the raw batched loop;
then the variants: the conversation with the model's flashAttention off, and one stream
with a decode thread left for the bus.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.bus_results import (
    ConcurrencyFigures,
    Conversation,
    ConversationFigures,
    FlashAttentionFigures,
    FlashAttentionOff,
    Level,
    RawBatched,
    Sample,
    SingleStream,
    SingleStreamFigures,
    SpareCore,
    SpareCoreFigures,
    TtftBreakdown,
    Turn,
)
from bench.sampling import CpuMeter, RssSampler
from bench.sides import BusSide, DirectSide, RawSide
from bench.stats import Run, median, percentile, ratio
from bench.workload import SYSTEM_PROMPT, BusBenchConfig, chat, conversation_turn, conversation_turns_shown, essay, greedy
from wire.api import ModelsList, ModelUpdate
from wire.params import ModelParams


@dataclass
class Rig:
    """What the measures run against: the sides, the meters on the service, where progress goes."""

    cfg: BusBenchConfig
    bus: BusSide
    direct: DirectSide
    raw: RawSide
    #: llama-server and llama-batched-bench (bench/peer_llama_server.py's LlamaPeer), or None.
    peer: Any
    cpu: CpuMeter
    rss: RssSampler
    log: Callable[[str], None]


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


# -- 1 + 2: one stream ---------------------------------------------------------------------------


async def single_stream(rig: Rig) -> SingleStreamFigures:
    cfg, n = rig.cfg, rig.cfg.tokens
    # raw8: the raw loop in a context shaped like the engine's (n_seq_max sequences of n_ctx cells), so
    # bus ÷ raw8 is the bus's cost alone and raw8 ÷ raw the cost of that context shape.
    order = ["bus", "direct", "raw", *(["raw8"] if rig.raw.batched is not None else []),
             *(["llama_server"] if rig.peer is not None else [])]
    runs: dict[str, list[Run]] = {side: [] for side in order}
    mismatched = 0
    for rep in range(cfg.stream_reps):
        nonce = f"{rep}-{uuid.uuid4().hex[:8]}"
        user = essay(nonce)
        sides = order[rep % len(order):] + order[:rep % len(order)]
        got: dict[str, Run] = {}
        for side in sides:
            if side == "bus":
                with rig.cpu.measure():
                    got[side] = await rig.bus.ask(f"speed-{rep}", user, greedy(n))
            elif side == "direct":
                got[side] = rig.direct.run(chat(user), n)
            elif side == "llama_server":
                got[side] = await rig.peer.complete(rig.raw.single.chat_prompt(chat(user)), n)
            else:
                got[side] = rig.raw.run(chat(user), n, engine_context=side == "raw8")
        for side, r in got.items():
            runs[side].append(r)
        if got["bus"].text != got["raw"].text[: len(got["bus"].text)]:
            mismatched += 1
        rig.log(f"  rep {rep}: " + " | ".join(
            f"{s} {fmt(got[s].tps(n), '.1f')} tok/s ttft {got[s].ttft_s * 1000:.1f} ms ({got[s].finish})"
            for s in order))

    # The peak RSS of one topic, from a run of its own: reading /proc 20 times a second during the timed runs
    # would take CPU from the decode threads that the other sides keep.
    with rig.rss.phase("1_topic"):
        await rig.bus.ask("speed-rss", essay(uuid.uuid4().hex[:8]), greedy(n))

    def tps(side: str) -> float | None:
        return median([t for r in runs[side] if (t := r.tps(n)) is not None])

    def paired(side: str) -> float | None:
        """The median over repetitions of bus ÷ ``side`` within the repetition: the runs of one repetition are
        seconds apart, so a machine whose speed drifts over minutes moves both terms of each ratio alike."""
        return median([ratio(b, o) for rb, ro in zip(runs["bus"], runs[side])
                       if (b := rb.tps(n)) is not None and (o := ro.tps(n)) is not None])

    def ttft_ms(side: str) -> float | None:
        m = median([r.ttft_s for r in runs[side]])
        return m * 1000 if m is not None else None

    bus = runs["bus"]
    tokens_measured = sum(r.tokens for r in bus)
    cpu = rig.cpu.totals
    parties = ("engine_worker", "service", "nats_server", "client")
    stream = SingleStream(
        tokens=n,
        reps=cfg.stream_reps,
        tps={s: tps(s) for s in runs},
        bus_over_side_paired={s: paired(s) for s in runs if s != "bus"},
        ttft_ms={s: ttft_ms(s) for s in runs},
        runs_reaching_max_tokens={s: sum(1 for r in runs[s] if r.tps(n) is not None) for s in runs},
        bus_engine_reported_tps=median([r.engine_tps for r in bus if r.engine_tps and r.tps(n)]),
        bus_ttft_breakdown_ms=TtftBreakdown(
            publish_to_started_event=median([r.started_ms for r in bus if r.started_ms is not None]),
            publish_to_engine_start=median([r.pre_engine_ms for r in bus if r.pre_engine_ms is not None]),
            engine_prompt_and_first_token=median([r.engine_ttft_ms for r in bus if r.engine_ttft_ms is not None]),
            first_token_delivery=median([
                r.ttft_s * 1000 - r.pre_engine_ms - r.engine_ttft_ms
                for r in bus if r.pre_engine_ms is not None and r.engine_ttft_ms is not None]),
        ),
        bus_cached_prompt_tokens=median([r.cached_tokens or 0 for r in bus]),
        bus_prompt_tokens=median([r.prompt_tokens or 0 for r in bus]),
        raw_prompt_tokens=median([r.prompt_tokens or 0 for r in runs["raw"]]),
        bus_token_messages_per_run=median([r.token_messages or 0 for r in bus]),
        texts_differ_from_raw=mismatched,
        cpu_ms_per_bus_token={k: round(1000 * cpu[k] / tokens_measured, 3) if tokens_measured else None
                              for k in parties},
        cpu_cores_busy_during_bus_runs={k: round(cpu[k] / cpu["wall"], 3) if cpu["wall"] else None for k in parties},
        samples={s: [Sample(tps=r.tps(n), ttft_ms=round(r.ttft_s * 1000, 2), finish=r.finish, tokens=r.tokens)
                     for r in runs[s]] for s in runs},
    )
    figures = SingleStreamFigures(
        single_stream=stream,
        bus_over_direct_tps=ratio(tps("bus"), tps("direct")),
        bus_over_raw_tps=ratio(tps("bus"), tps("raw")),
        direct_over_raw_tps=ratio(tps("direct"), tps("raw")),
        ttft_overhead_ms=median([(b.ttft_s - d.ttft_s) * 1000 for b, d in zip(bus, runs["direct"])]),
        bus_ttft_outside_engine_ms=median([r.ttft_s * 1000 - r.engine_ttft_ms for r in bus
                                           if r.engine_ttft_ms is not None]),
    )
    if "llama_server" in runs:
        figures.llama_server_one_stream_tps = tps("llama_server")
        figures.bus_over_llama_server_tps = ratio(tps("bus"), tps("llama_server"))
    if "raw8" in runs:
        figures.bus_over_raw_engine_context_tps = ratio(tps("bus"), tps("raw8"))
        figures.raw_engine_context_over_raw_tps = ratio(tps("raw8"), tps("raw"))
    return figures


# -- 3: a conversation ---------------------------------------------------------------------------


async def conversation(rig: Rig) -> ConversationFigures:
    cfg = rig.cfg
    turns, n = cfg.turns, cfg.turn_tokens
    bus_ttft: dict[int, list[float]] = defaultdict(list)
    fresh_ttft: dict[int, list[float]] = defaultdict(list)
    reuse_ttft: dict[int, list[float]] = defaultdict(list)
    cached: dict[int, list[int]] = defaultdict(list)
    prompt: dict[int, list[int]] = defaultdict(list)
    pre: dict[int, list[float]] = defaultdict(list)
    engine: dict[int, list[float]] = defaultdict(list)
    peer_ttft: dict[int, list[float]] = defaultdict(list)  # llama-server, its own replies as history, one slot
    # llama-cpp-python keeping its own KV cache across the turns (its longest-prefix reuse): what prefix
    # reuse gives without the bus. It evaluates the previous reply and the new message each turn.
    reusing = DirectSide(cfg.model, rig.direct.n_threads, cfg.n_ctx, cfg.n_batch, cfg.gpu_layers)
    report_turns = conversation_turns_shown(turns)
    for rep in range(cfg.conv_reps):
        topic = f"conv-{rep}"
        history: list[dict[str, str]] = [{"role": "system", "content": SYSTEM_PROMPT}]
        peer_history = list(history)
        for turn in range(1, turns + 1):
            user = conversation_turn(turn, rep)
            b = await rig.bus.ask(topic, user, greedy(n))
            if rig.peer is not None:
                peer_history.append({"role": "user", "content": user})
                p = await rig.peer.complete(rig.raw.single.chat_prompt(peer_history), n, id_slot=0)
                peer_ttft[turn].append(p.ttft_s * 1000)
                peer_history.append({"role": "assistant", "content": p.text})
            msgs = [*history, {"role": "user", "content": user}]
            reuse_ttft[turn].append(reusing.run(msgs, 1, reset=turn == 1).ttft_s * 1000)
            # The no-reuse baseline: the same conversation, evaluated from an empty cache (at the turns the
            # report shows: late turns cost seconds each).
            if turn in report_turns:
                fresh_ttft[turn].append(rig.direct.run(msgs, 1, reset=True).ttft_s * 1000)
            bus_ttft[turn].append(b.ttft_s * 1000)
            cached[turn].append(b.cached_tokens or 0)
            prompt[turn].append(b.prompt_tokens or 0)
            if b.pre_engine_ms is not None and b.engine_ttft_ms is not None:
                pre[turn].append(b.pre_engine_ms)
                engine[turn].append(b.engine_ttft_ms)
            history += [{"role": "user", "content": user}, {"role": "assistant", "content": b.text}]
        rig.log(f"  conversation {rep}: turn 1 {bus_ttft[1][-1]:.1f} ms, turn {turns} {bus_ttft[turns][-1]:.1f} ms"
                f" (direct with its cache: {reuse_ttft[1][-1]:.1f} -> {reuse_ttft[turns][-1]:.1f} ms;"
                f" no reuse: {fresh_ttft[1][-1]:.1f} -> {fresh_ttft[turns][-1]:.1f} ms)")
    reusing.close()
    per_turn = [Turn(turn=t, bus_ttft_ms=median(bus_ttft[t]), no_reuse_ttft_ms=median(fresh_ttft[t]),
                     direct_reuse_ttft_ms=median(reuse_ttft[t]), prompt_tokens=median(prompt[t]),
                     cached_tokens=median(cached[t]), bus_publish_to_engine_ms=median(pre[t]),
                     bus_engine_ttft_ms=median(engine[t]), llama_server_ttft_ms=median(peer_ttft[t]))
                for t in range(1, turns + 1)]
    figures = ConversationFigures(
        conversation=Conversation(turns=turns, tokens_per_turn=n, reps=cfg.conv_reps, per_turn=per_turn),
        turn20_over_turn1_ttft=ratio(median(bus_ttft[turns]), median(bus_ttft[1])),
        turn20_over_turn1_ttft_no_reuse=ratio(median(fresh_ttft[turns]), median(fresh_ttft[1])),
        turn20_over_turn1_ttft_direct_reuse=ratio(median(reuse_ttft[turns]), median(reuse_ttft[1])),
        turn20_ttft_bus_over_direct_reuse=ratio(median(bus_ttft[turns]), median(reuse_ttft[turns])),
    )
    if rig.peer is not None:
        figures.llama_server_turn20_ttft_ms = median(peer_ttft[turns])
        figures.turn20_ttft_over_llama_server = ratio(median(bus_ttft[turns]), median(peer_ttft[turns]))
    return figures


# -- 4 + issue 6: concurrent topics --------------------------------------------------------------


async def concurrency(rig: Rig, batch_level: int, n_seq_max: int) -> tuple[ConcurrencyFigures, dict[str, Any]]:
    """The figures, and llama-server's beside them (its ``batch_results``; empty without the peer)."""
    cfg, n = rig.cfg, rig.cfg.tokens
    agg: dict[int, list[float]] = defaultdict(list)
    ttfts: dict[int, list[float]] = defaultdict(list)
    short: Counter[int] = Counter()
    raw_agg: list[float] = []
    raw_prefill_s: list[float] = []
    raw_decode_tps: list[float] = []
    peer: dict[str, list[Any]] = defaultdict(list)  # llama-server with k streams at once; llama-batched-bench
    for rep in range(cfg.reps):
        for k in cfg.concurrency:
            users = [essay(f"{rep}-{k}-{i}-{uuid.uuid4().hex[:6]}") for i in range(k)]
            with rig.rss.phase(f"concurrency_{k}"):
                runs = await asyncio.gather(*(rig.bus.ask(f"conc{k}-{rep}-{i}", u, greedy(n))
                                              for i, u in enumerate(users)))
            wall = max(r.t_last for r in runs) - min(r.t0 for r in runs)
            agg[k].append(sum(r.tokens for r in runs) / wall)
            ttfts[k].extend(r.ttft_s * 1000 for r in runs)
            short[k] += sum(1 for r in runs if r.finish != "length")
            line = f"  rep {rep} x{k}: bus {agg[k][-1]:.1f} tok/s aggregate"
            if k == batch_level and k > 1 and rig.raw.batched is not None:
                rb = rig.raw.run_batched([chat(u) for u in users], n)
                raw_agg.append(rb["tokens_per_s"])
                raw_prefill_s.append(rb["prefill_s"])
                raw_decode_tps.append(rb["decode_tokens_per_s"])
                line += f" | raw batched {raw_agg[-1]:.1f} tok/s"
            if k == batch_level and k > 1 and rig.peer is not None:
                single = rig.raw.single
                line += " | " + await rig.peer.measure_batch([single.chat_prompt(chat(u)) for u in users],
                                                             len(single.tokenize(single.chat_prompt(chat(users[0])))),
                                                             n, peer)
            rig.log(line)
    figures = ConcurrencyFigures(
        concurrency=[Level(topics=k, aggregate_tps=median(agg[k]), ttft_p50_ms=percentile(ttfts[k], 50),
                           ttft_p95_ms=percentile(ttfts[k], 95), requests=len(ttfts[k]),
                           stopped_before_max_tokens=short[k])
                     for k in cfg.concurrency],
        raw_batched=RawBatched(sequences=batch_level, aggregate_tps=median(raw_agg), prefill_s=median(raw_prefill_s),
                               decode_phase_tps=median(raw_decode_tps), engine_n_seq_max=n_seq_max, samples=raw_agg),
        batched8_over_raw_batched8=ratio(median(agg.get(batch_level, [])), median(raw_agg)),
    )
    beside: dict[str, Any] = {}
    if rig.peer is not None and peer:
        beside = rig.peer.batch_results(peer, agg.get(batch_level, []), ttfts.get(batch_level, []))
    return figures, beside


# -- the variants: what flashAttention=off and a core left for the bus change --------------------


async def _update_load(bus: BusSide, **load: Any) -> None:
    """Store load parameters on the bench's model; the next request loads it with them."""
    models = await bus.client.call(ModelsList())
    model_id = next(m.id for m in models.models if m.active)
    await bus.client.call(ModelUpdate(model_id=model_id, load=ModelParams(**load)))


async def flash_attention_off(rig: Rig) -> FlashAttentionFigures:
    """The conversation again with flash attention off, through the bus only (turns 1 and 20 matter)."""
    cfg = rig.cfg
    await _update_load(rig.bus, flash_attention="off")
    await rig.bus.ask("fa-off-warm", "Say hello.", greedy(8))  # loads the model with flash attention off
    first: list[float] = []
    last: list[float] = []
    for rep in range(cfg.conv_reps):
        for turn in range(1, cfg.turns + 1):
            user = conversation_turn(turn, rep)
            b = await rig.bus.ask(f"conv-fa-off-{rep}", user, greedy(cfg.turn_tokens))
            if turn == 1:
                first.append(b.ttft_s * 1000)
            elif turn == cfg.turns:
                last.append(b.ttft_s * 1000)
    off = FlashAttentionOff(turn1_ttft_ms=median(first), turn20_ttft_ms=median(last),
                            turn20_over_turn1_ttft=ratio(median(last), median(first)))
    rig.log(f"  flashAttention off: conversation turn 1 {median(first):.1f} ms, turn {cfg.turns} {median(last):.1f} ms")
    return FlashAttentionFigures(flash_attention_off=off)


async def spare_core(rig: Rig, threads: int) -> SpareCoreFigures:
    """One stream with one decode thread fewer, so the bus has a core of its own: the raw loop gets the
    same thread count, so the ratio is the bus's own cost once it need not interrupt the decode threads."""
    cfg = rig.cfg
    spare = max(1, threads - 1)
    await _update_load(rig.bus, flash_attention="auto", threads=spare)
    raw = RawSide(cfg.model, spare, cfg.n_ctx, cfg.n_batch, 1, cfg.gpu_layers)
    n = cfg.tokens
    bus_tps: list[float] = []
    raw_tps: list[float] = []
    try:
        await rig.bus.ask("spare-warm", "Say hello.", greedy(8))  # loads the model with `spare` threads
        for rep in range(cfg.reps):
            user = essay(f"spare-{rep}-{uuid.uuid4().hex[:8]}")
            b = await rig.bus.ask(f"spare-{rep}", user, greedy(n))
            r = raw.run(chat(user), n)
            bus_tps += [t for t in (b.tps(n),) if t is not None]
            raw_tps += [t for t in (r.tps(n),) if t is not None]
    finally:
        raw.close()
        await _update_load(rig.bus, threads=threads)
    rig.log(f"  {spare} decode thread(s): bus {fmt(median(bus_tps), '.1f')} tok/s, "
            f"raw {fmt(median(raw_tps), '.1f')} tok/s")
    return SpareCoreFigures(spare_core=SpareCore(
        engine_threads=spare, cores=os.cpu_count(), bus_tps=median(bus_tps), raw_tps=median(raw_tps),
        bus_over_raw_tps=ratio(median(bus_tps), median(raw_tps))))
