"""What the bus costs: lamabus end to end against llama-cpp-python and a raw llama.cpp loop.

Run through ``python -m bench`` (bench/__main__.py), which adds the registry
figures and writes docs/benchmarks.md and bench/results.json.

Set-up, all on this machine:

* the broker: an :class:`~bus.broker.embedded.EmbeddedNatsServer` (a real nats-server,
  JetStream on, port 0), owned by this process;
* lamabus: a SUBPROCESS ``python -m bus.cli serve --nats-url URL --data-dir TMP``
  with the bundled model, so its CPU and memory are its own (RSS is read from
  its process tree) and its event loop does not share a GIL with the client;
* the client: this process, one NATS connection, one wildcard subscription on
  ``<prefix>.topic.*.*`` that timestamps every ``generation.token`` and
  ``generation.completed`` as it arrives; messages are posted with
  :meth:`bus.client.LamabusClient.post` (JetStream publish, waits for the PubAck);
* the baselines, in this process: llama-cpp-python's
  ``Llama.create_chat_completion(stream=True)`` ("direct") and
  :class:`bench.baseline.RawLlama` (the raw decode loop with the C sampler chain;
  ``run_batched`` for the batched baseline).

Only one side generates at a time: every repetition runs the bus, the direct
API and the raw loop one after another (the order rotates per repetition), on
the same model, prompt (a per-repetition nonce, so no side gets a cache hit
from the last repetition) and parameters (greedy: temperature 0, seed 42, an
empty stop list, the same maxTokens, the same thread count as the service's
engine reports). Two processes spinning llama.cpp's OpenMP threads at once on
2 cores would measure the scheduler, not the bus.

Definitions (identical for every side, client-side clocks):

* TTFT: from just before the request is made (bus: the JetStream publish of the
  chat.message; direct: the create_chat_completion call; raw: the first
  llama_decode) to the arrival of the first content token.
* tok/s: the decode rate after the first token, ``(N - 1) / (t_last - t_first)``,
  t_first/t_last the arrival of the first/last content token, N the completion
  tokens. Only runs that reach maxTokens (finish reason ``length``) count, so N
  is the same for every side; runs that stopped early are reported as such.
* aggregate tok/s (concurrency, batched): all completion tokens / (last token
  arrival - first request), prompt evaluation included; the raw batched loop
  is timed the same way by bench/baseline.py.

The parts, one module each: the workload (bench/workload.py: parameters, prompts),
the sides (bench/sides.py), the measures (bench/bus_measures.py), their typed
figures (bench/bus_results.py; bench/stats.py for medians and ratios), /proc
sampling and the machine (bench/sampling.py) and the profile taken when a target
is missed (bench/profiling.py). This module starts everything, runs the measures
in order and collects their figures into the dict bench/results.json is made of.
"""

from __future__ import annotations

import asyncio
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

import msgspec  # noqa: E402
import nats  # noqa: E402

from bench import bus_measures  # noqa: E402
from bench.bus_results import EngineInfo, ModelInfo, ProfileFigures, RssFigures, SetupFigures, figures  # noqa: E402
from bench.profiling import profile  # noqa: E402
from bench.report import missed_targets  # noqa: E402
from bench.sampling import CpuMeter, RssSampler, load_average, machine_info, status_kb  # noqa: E402
from bench.sides import BusSide, DirectSide, RawSide, ServiceProcess, use_model, wait_ready  # noqa: E402
from bench.workload import BusBenchConfig, bundled_model, chat, essay, greedy  # noqa: E402
from bus.broker.embedded import EmbeddedNatsServer  # noqa: E402

# What bench/__main__.py takes from here.
__all__ = ["BusBench", "BusBenchConfig", "bundled_model", "run"]


class BusBench:
    """Starts the broker, the service and the sides, runs the measures, collects their figures."""

    def __init__(self, cfg: BusBenchConfig) -> None:
        self.cfg = cfg
        self.log = cfg.log
        self.results: dict[str, Any] = {}

    def _add(self, part: msgspec.Struct | dict[str, Any]) -> None:
        self.results.update(part if isinstance(part, dict) else figures(part))

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        work = Path(tempfile.mkdtemp(prefix="lamabus-bench-", dir=cfg.workdir))
        self.work = work
        raw: RawSide | None = None
        service: ServiceProcess | None = None
        try:
            async with EmbeddedNatsServer(work / "jetstream") as broker:
                assert broker.url is not None
                bundled = os.path.realpath(cfg.model) == os.path.realpath(bundled_model())
                service = ServiceProcess(broker.url, work / "data", work / "service.log",
                                         model_dir=None if bundled else os.path.dirname(os.path.realpath(cfg.model)),
                                         token_batch_ms=cfg.token_batch_ms)
                service.start()
                nc = await nats.connect(broker.url, name="lamabus-bench")
                peer: Any = None
                try:
                    bus = BusSide(nc)
                    await bus.start()
                    t0 = time.perf_counter()
                    await wait_ready(bus, service)
                    # cfg.model, with the layers every side offloads stored on it (--gpu-layers)
                    await use_model(bus, cfg.model, cfg.gpu_layers, bundled)
                    warm = await bus.ask("warmup", "Say hello.", greedy(8))  # loads the model
                    ready_s = time.perf_counter() - t0
                    diag = await bus.diagnostics()
                    eng = diag.service.engine or {}
                    model = eng["models"][0]
                    context = model["context"]
                    threads = int(context["nThreads"])
                    n_seq_max = int(context["nSeqMax"])
                    self._add(SetupFigures(
                        model=ModelInfo(file=Path(cfg.model).name, path=cfg.model, bytes=os.path.getsize(cfg.model),
                                        name=model.get("name"), architecture=model.get("architecture"),
                                        quantization=model.get("quantization")),
                        engine=EngineInfo(n_threads=threads, n_seq_max=n_seq_max,
                                          n_ctx_per_sequence=context["nCtxPerSequence"], n_batch=context["nBatch"],
                                          workers=eng["workers"], load_seconds=model.get("loadSeconds"),
                                          memory_predicted_mb={k: round(v / 2**20, 1) for k, v in
                                                               (model.get("memory", {}).get("predicted") or {}).items()}),
                        service_ready_s=round(ready_s, 2),
                        warmup_finish=warm.finish,
                    ))
                    gpu = model.get("gpu") or {}
                    self.results["gpu"] = {k: gpu.get(k) for k in ("nGpuLayersRequested", "nGpuLayersUsed", "layers",
                                                                  "device", "vramUsedByModelBytes", "reasonNoGPU")}
                    self.log(f"service up in {ready_s:.1f} s; engine: {threads} threads, {n_seq_max} sequences, "
                             f"{gpu.get('nGpuLayersUsed')} of {gpu.get('layers')} layers on "
                             f"{gpu.get('device') or 'no GPU'}")
                    direct = DirectSide(cfg.model, threads, cfg.n_ctx, cfg.n_batch, cfg.gpu_layers)
                    batch_level = max(cfg.concurrency) if cfg.concurrency else 1
                    raw = RawSide(cfg.model, threads, cfg.n_ctx, cfg.n_batch, max(1, batch_level), cfg.gpu_layers)
                    peer = await self._start_peer(threads, n_seq_max, int(context["nCtxPerSequence"]),
                                                  int(context["nBatch"]))
                    # Warm every side once (page the weights in, build the caches).
                    direct.run(chat(essay("warm")), 8)
                    raw.run(chat(essay("warm")), 8)
                    cpu = CpuMeter(service.pid, broker.pid)
                    with RssSampler(service.pid) as rss:
                        rig = bus_measures.Rig(cfg=cfg, bus=bus, direct=direct, raw=raw, peer=peer, cpu=cpu, rss=rss,
                                               log=self.log)
                        self._add(await bus_measures.single_stream(rig))
                        if not cfg.streams_only:
                            self._add(await bus_measures.conversation(rig))
                        for part in await bus_measures.concurrency(rig, batch_level, n_seq_max):
                            self._add(part)
                        eight = f"concurrency_{batch_level}"
                        self._add(RssFigures(
                            rss_mb_1_topic=rss.mb("1_topic"), rss_mb_8_topics=rss.mb(eight),
                            rss_topics_measured=batch_level,
                            rss_split_mb={"1_topic": rss.split_mb("1_topic"), "8_topics": rss.split_mb(eight)},
                            rss_processes={"1_topic": rss.procs.get("1_topic"), "8_topics": rss.procs.get(eight)}))
                    self.results["nats_server_rss_mb"] = status_kb(broker.pid, "VmRSS:") / 1024 if broker.pid else None
                    if cfg.streams_only:
                        return self.results
                    self._add(ProfileFigures(profile=await profile(cfg, bus, service, work,
                                                                   missed_targets(self.results))))
                    self._add(await bus_measures.flash_attention_off(rig))
                    self._add(await bus_measures.spare_core(rig, threads))
                finally:
                    if peer is not None:
                        await peer.stop()
                    service.stop()
                    await nc.close()
        except BaseException:
            if service is not None:
                self.log("service log tail:\n" + service.log_tail())
            raise
        finally:
            if raw is not None:
                raw.close()
            shutil.rmtree(work, ignore_errors=True)
        return self.results

    async def _start_peer(self, threads: int, n_seq_max: int, n_ctx_seq: int, n_batch: int) -> Any:
        """llama-server shaped like the engine, and llama-batched-bench (bench/peer_llama_server.py); None: no peer."""
        if not self.cfg.llama_server_dir:
            return None
        from bench.peer_llama_server import LlamaPeer, ServerShape

        peer = LlamaPeer(Path(self.cfg.llama_server_dir), self.cfg.model,
                         ServerShape(threads=threads, parallel=n_seq_max, n_ctx_per_seq=n_ctx_seq, n_batch=n_batch,
                                     gpu_layers=self.cfg.gpu_layers),
                         self.work / "llama-server.log")
        await peer.start()
        self.results["llama_server"] = peer.describe()
        self.log(f"llama-server up: {peer.server.command_line()}")
        return peer


def run(cfg: BusBenchConfig) -> dict[str, Any]:
    """Measure everything that goes through the bus; returns the results dict."""
    results: dict[str, Any] = {"machine": figures(machine_info()), "load_average_start": load_average()}
    t0 = time.perf_counter()
    results.update(asyncio.run(BusBench(cfg).run()))
    results["bus_seconds"] = round(time.perf_counter() - t0, 1)
    results["load_average_end"] = load_average()
    return results
