"""The soak's second and third parts (bench/soak.py): ``lamabus serve`` SIGKILLed, and the
nats-server stopped and started again, while a reply streams; each message must then be
answered exactly once."""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from typing import Any

from bench.soak_rig import (
    COUNTING,
    Rig,
    chat,
    exactly_once,
    first_token,
    long_params,
    timing_figures,
    wait_end,
)
from wire.messages import GenerationCompleted


async def part_kill(rig: Rig, cfg: dict, bound: float) -> dict:
    began = time.monotonic()
    topic = "soak-kill"
    mids: list[str] = []
    recovery: list[float] = []
    ends: collections.Counter[str] = collections.Counter()
    finished_before_kill = 0
    crashes = 0
    timings: list[Any] = []
    accepted: list[float] = []
    params = long_params(cfg["long_tokens"])
    for _ in range(cfg["kills"]):
        if time.monotonic() - began > bound * 0.85:
            break
        assert rig.serve is not None
        message = chat(topic, COUNTING, params)
        mids.append(message.id)
        seq, _ = await first_token(rig, message)
        if not rig.serve.alive:
            crashes += 1
        await rig.serve.kill()
        killed, killed_wall = time.monotonic(), time.time()
        events = await rig.stored(topic)
        if any(isinstance(e, GenerationCompleted) and e.request_id == message.id for e in events):
            finished_before_kill += 1
        await rig.restart_serve()
        ended = await wait_end(rig, topic, message.id, seq, timeout=120.0)
        if ended is None:
            ends["none"] += 1
            continue
        ends[type(ended).__name__] += 1
        if isinstance(ended, GenerationCompleted):
            recovery.append(time.monotonic() - killed)
            timings.append(ended.timing)
            # When the restarted service accepted the redelivered message (the engine's start less its queue).
            accepted.append((ended.timing.start_time - ended.timing.queue_time) / 1000 - killed_wall)
    settled = await rig.settled(60.0)
    await asyncio.sleep(1.0)
    check = exactly_once(await rig.stored(topic), mids)
    alive = rig.serve is not None and rig.serve.alive
    return {
        "planned": cfg["kills"], "reached": len(mids), "bounded": len(mids) < cfg["kills"],
        **check, "ends": dict(ends), "finished_before_kill": finished_before_kill,
        "kill_to_completed_p50_s": round(statistics.median(recovery), 2) if recovery else None,
        "kill_to_completed_max_s": round(max(recovery), 2) if recovery else None,
        "kill_to_accepted_again_p50_s": round(statistics.median(accepted), 2) if accepted else None,
        "kill_to_accepted_again_max_s": round(max(accepted), 2) if accepted else None,
        **timing_figures(timings),
        "restart_to_ready_p50_s": round(statistics.median(rig.start_seconds[1:]), 2) if len(rig.start_seconds) > 1
        else None,
        "crashes": crashes, "consumer_settled": settled, "alive_after": alive,
        "seconds": round(time.monotonic() - began, 1),
    }


async def part_broker(rig: Rig, cfg: dict, bound: float) -> dict:
    began = time.monotonic()
    topic = "soak-broker"
    mids: list[str] = []
    ends: collections.Counter[str] = collections.Counter()
    back: list[float] = []
    timings: list[Any] = []
    params = long_params(cfg["long_tokens"])
    for n in range(cfg["broker_restarts"]):
        if time.monotonic() - began > bound * 0.85:
            break
        message = chat(topic, COUNTING, params)
        mids.append(message.id)
        seq, _ = await first_token(rig, message)
        if n % 2 == 0:
            await rig.broker.kill()
        else:
            await rig.broker.stop()
        down = time.monotonic()
        await asyncio.sleep(0.5)
        await rig.broker.start()  # the same port and store
        ended = await wait_end(rig, topic, message.id, seq, timeout=120.0)
        ends[type(ended).__name__ if ended is not None else "none"] += 1
        if isinstance(ended, GenerationCompleted):
            back.append(time.monotonic() - down)
            timings.append(ended.timing)
    settled = await rig.settled(60.0)
    await asyncio.sleep(1.0)
    check = exactly_once(await rig.stored(topic), mids)
    crashes = 0 if rig.serve is not None and rig.serve.alive else 1
    return {
        "planned": cfg["broker_restarts"], "reached": len(mids), "bounded": len(mids) < cfg["broker_restarts"],
        **check, "ends": dict(ends), "crashes": crashes,
        "restart_to_completed_p50_s": round(statistics.median(back), 2) if back else None,
        "restart_to_completed_max_s": round(max(back), 2) if back else None,
        **timing_figures(timings),
        "consumer_settled": settled, "seconds": round(time.monotonic() - began, 1),
    }

